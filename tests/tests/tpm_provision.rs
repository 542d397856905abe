//! vTPM provisioning (`vkx-host vtpm`) and guest evidence (`vkx-guest
//! evidence`, `vkx_guest::tpm`) against a real swtpm per test, with
//! tpm2-tools' `tpm2_checkquote` as the independent check of the quote and
//! x509-parser (ring) as the independent check of the AK certificate.
//!
//! tpm2_checkquote takes PCR values as a raw file: the digests
//! concatenated in the order of its `-l` selection (what `tpm2_pcrread -o`
//! writes). The tests write that file from the guest's pcrs.json and also
//! check it equals tpm2_pcrread's output on the same swtpm.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use vkx_common::tpm::{AK_CERT_NV_INDEX, AK_PERSISTENT_HANDLE};
use vkx_common::wire::{HashAlg, PcrBankSelection};
use vkx_e2e::node::Node;
use vkx_e2e::run;
use vkx_e2e::swtpm::Swtpm;
use vkx_guest::tpm::{AkAuth, TpmError};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} (tpm2-tools) not runnable: {e}; run `make test`"))
}

const NONCE: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The AK authValue provisioning wrote for `vm` (the guest's ak_auth_file).
fn ak_auth(node: &Node, vm: &str) -> AkAuth {
    AkAuth::load(Path::new(&node.ak_auth_file(vm))).unwrap()
}

/// `vkx-guest evidence` on `tpm`, with `ak_auth_file` if given.
fn guest_evidence(
    tpm: &Swtpm,
    ak_auth_file: Option<&str>,
    nonce: &str,
    pcrs: &[&str],
    out: &Path,
) -> Output {
    let out = out.display().to_string();
    let tcti = tpm.tcti();
    let mut args = vec![
        "evidence",
        "--tcti",
        &tcti,
        "--nonce",
        nonce,
        "--out-dir",
        &out,
    ];
    if let Some(file) = ak_auth_file {
        args.extend(["--ak-auth-file", file]);
    }
    for p in pcrs {
        args.extend(["--pcrs", p]);
    }
    run("vkx-guest", &args, b"")
}

/// Writes pcrs.bin (tpm2_checkquote's format) from pcrs.json for the
/// selection `sel` (e.g. "sha256:0,1,7+sha1:0"), in `sel`'s order.
fn pcrs_bin_from_json(dir: &Path, sel: &str) -> Vec<u8> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("pcrs.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for bank in sel.split('+') {
        let (alg, list) = bank.split_once(':').unwrap();
        for index in list.split(',') {
            let hex = json[alg][index].as_str().unwrap();
            out.extend(hex::decode(hex).unwrap());
        }
    }
    std::fs::write(dir.join("pcrs.bin"), &out).unwrap();
    out
}

/// The independent check: tpm2_checkquote with the guest's files.
fn checkquote(dir: &Path, sel: &str, nonce: &str) -> Output {
    let p = |f: &str| dir.join(f).display().to_string();
    tool(
        "tpm2_checkquote",
        &[
            "-u",
            &p("ak.pub"),
            "-m",
            &p("attest.bin"),
            "-s",
            &p("signature.bin"),
            "-f",
            &p("pcrs.bin"),
            "-l",
            sel,
            "-g",
            "sha256",
            "-q",
            nonce,
        ],
    )
}

/// Provision, boot (restart swtpm), quote, and check everything.
fn provision_and_attest(ek: &str) {
    let node = Node::new();
    let mut tpm = Swtpm::start();
    let o = node.provision(&tpm, "vm-1", ek);
    assert!(o.status.success(), "provision: {}", stderr(&o));
    assert!(
        stdout(&o).contains("vm vm-1: provisioned"),
        "{}",
        stdout(&o)
    );
    // Idempotent: the same VM on the same vTPM is a verified no-op.
    let o = node.provision(&tpm, "vm-1", ek);
    assert!(o.status.success(), "re-run: {}", stderr(&o));
    assert!(
        stdout(&o).contains("already provisioned (verified)"),
        "{}",
        stdout(&o)
    );

    // The VM boots: swtpm restarts on the same state.
    tpm.restart();
    let dir = tempfile::tempdir().unwrap();
    let sel = "sha256:0,1,7,16+sha1:0";
    let auth_file = node.ak_auth_file("vm-1");
    let o = guest_evidence(
        &tpm,
        Some(&auth_file),
        NONCE,
        &["sha256:0,1,7,16", "sha1:0"],
        dir.path(),
    );
    assert!(o.status.success(), "evidence: {}", stderr(&o));
    for f in [
        "attest.bin",
        "signature.bin",
        "ak.pub",
        "pcrs.json",
        "ak-cert.der",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }

    // PCR values: ours equal tpm2_pcrread's, byte for byte.
    let ours = pcrs_bin_from_json(dir.path(), sel);
    let theirs = dir.path().join("pcrread.bin");
    let o = tool(
        "tpm2_pcrread",
        &["-T", &tpm.tcti(), "-o", &theirs.display().to_string(), sel],
    );
    assert!(o.status.success(), "tpm2_pcrread: {}", stderr(&o));
    assert_eq!(ours, std::fs::read(&theirs).unwrap());

    // The quote verifies with tpm2_checkquote, and not with another nonce.
    let o = checkquote(dir.path(), sel, NONCE);
    assert!(
        o.status.success(),
        "tpm2_checkquote: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let wrong = NONCE.replace("00112233", "ffffffff");
    assert!(!checkquote(dir.path(), sel, &wrong).status.success());

    // The registry recorded this AK (the AK name in the evidence).
    let entry = node.entry("vm-1");
    assert_eq!(entry["ek_alg"], ek);
    let evidence = vkx_guest::tpm::collect_evidence(
        &tpm.tcti(),
        &ak_auth(&node, "vm-1"),
        &[PcrBankSelection {
            hash_alg: HashAlg::Sha256,
            pcrs: vec![0],
        }],
        &[7; 32],
    )
    .unwrap();
    assert_eq!(entry["ak_name"], hex::encode(&evidence.ak_name));

    // The AK certificate: X.509, CN and SAN name the VM, the key is the
    // AK's, signed by the node CA, and its digest is in the registry.
    let cert_der = std::fs::read(dir.path().join("ak-cert.der")).unwrap();
    assert_eq!(evidence.ak_cert.as_deref(), Some(cert_der.as_slice()));
    assert_eq!(
        entry["ak_cert_sha256"],
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &cert_der))
    );
    check_ak_cert(&node, &cert_der, "vm-1", &entry);
}

fn check_ak_cert(node: &Node, cert_der: &[u8], vm_id: &str, entry: &serde_json::Value) {
    use x509_parser::prelude::*;
    let ca_der = std::fs::read(Path::new(&node.ca()).join("ca-cert.der")).unwrap();
    let (rest, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(rest.is_empty());
    let (rest, cert) = X509Certificate::from_der(cert_der).unwrap();
    assert!(rest.is_empty());
    assert!(ca.is_ca());
    ca.verify_signature(None).expect("CA is self-signed");
    cert.verify_signature(Some(ca.public_key()))
        .expect("AK certificate chains to the node CA");
    assert_eq!(cert.issuer(), ca.subject());
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), vm_id);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uri = format!("urn:vkx:vm:{vm_id}");
    assert!(
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::URI(u) if *u == uri)),
        "{:?}",
        san.value
    );
    // The certified key is the AK: its bytes appear in the AK's public
    // area (EC point coordinates or the RSA modulus).
    let ak_public = hex::decode(entry["ak_public"].as_str().unwrap()).unwrap();
    let key = cert.public_key().subject_public_key.data.to_vec();
    let needle: Vec<u8> = match cert.public_key().parsed().unwrap() {
        x509_parser::public_key::PublicKey::EC(p) => p.data()[1..33].to_vec(),
        x509_parser::public_key::PublicKey::RSA(r) => {
            let m = r.modulus;
            m[m.iter().position(|&b| b != 0).unwrap()..].to_vec()
        }
        other => panic!("unexpected AK key type {other:?} ({} bytes)", key.len()),
    };
    assert!(
        ak_public
            .windows(needle.len())
            .any(|w| w == needle.as_slice()),
        "certificate key is not the AK"
    );
}

#[test]
fn ecc_provision_quote_and_certificate_check_out() {
    provision_and_attest("ecc");
}

#[test]
fn rsa_provision_quote_and_certificate_check_out() {
    provision_and_attest("rsa");
}

#[test]
fn refuses_a_vtpm_recorded_for_another_vm() {
    let node = Node::new();
    let tpm = Swtpm::start();
    assert!(node.provision(&tpm, "vm-a", "ecc").status.success());
    let o = node.provision(&tpm, "vm-b", "ecc");
    assert!(!o.status.success());
    let msg = stderr(&o);
    assert!(msg.contains("recorded for vm vm-a, not vm-b"), "{msg}");
    assert!(!msg.contains("0x0000"), "raw TSS code only: {msg}");
    // The other algorithm's AK is refused too (the handle is taken).
    let o = node.provision(&tpm, "vm-b", "rsa");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("vm-a"), "{}", stderr(&o));
    assert!(!Path::new(&node.registry()).join("vm-b.json").exists());
}

#[test]
fn refuses_a_vm_id_already_provisioned_on_another_vtpm() {
    let node = Node::new();
    let first = Swtpm::start();
    let second = Swtpm::start();
    assert!(node.provision(&first, "vm-1", "ecc").status.success());
    let before = node.entry("vm-1");
    let o = node.provision(&second, "vm-1", "ecc");
    assert!(!o.status.success());
    let msg = stderr(&o);
    assert!(
        msg.contains("already has vm vm-1 with a different AK"),
        "{msg}"
    );
    assert_eq!(node.entry("vm-1"), before, "the entry is untouched");
    // Nothing was made persistent on the refused vTPM.
    let out = tempfile::tempdir().unwrap();
    let o = guest_evidence(&second, None, NONCE, &["sha256:0"], out.path());
    assert!(!o.status.success());
}

#[test]
fn invalid_vm_ids_and_missing_ca_are_refused() {
    let node = Node::new();
    let tpm = Swtpm::start();
    let o = node.provision(&tpm, "../etc", "ecc");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid vm-id"), "{}", stderr(&o));
    let o = run(
        "vkx-host",
        &[
            "vtpm",
            "provision",
            "--tcti",
            &tpm.tcti(),
            "--vm-id",
            "vm-1",
            "--registry",
            &node.registry(),
            "--ca-dir",
            "/nonexistent",
        ],
        b"",
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("vkx-host vtpm ca-init"),
        "{}",
        stderr(&o)
    );
    let o = run("vkx-host", &["vtpm", "ca-init", "--dir", &node.ca()], b"");
    assert!(!o.status.success(), "ca-init must not overwrite");
}

#[test]
fn evidence_without_ak_names_the_fix() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let o = guest_evidence(&tpm, None, NONCE, &["sha256:0"], dir.path());
    assert!(!o.status.success());
    let msg = stderr(&o);
    assert!(
        msg.contains(&format!(
            "no AK at persistent handle {AK_PERSISTENT_HANDLE:#010x}"
        )) && msg.contains("vkx-host vtpm provision"),
        "{msg}"
    );
    let err = vkx_guest::tpm::collect_evidence(
        &tpm.tcti(),
        &AkAuth::empty(),
        &[PcrBankSelection {
            hash_alg: HashAlg::Sha256,
            pcrs: vec![0],
        }],
        &[0; 32],
    )
    .unwrap_err();
    assert!(matches!(err, TpmError::NoAk), "{err}");
}

#[test]
fn extended_pcr_changes_the_reported_value_and_all_24_pcrs_are_read() {
    let node = Node::new();
    let tpm = Swtpm::start();
    assert!(node.provision(&tpm, "vm-1", "ecc").status.success());
    let all: Vec<u8> = (0..24).collect();
    let sel = [PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: all.clone(),
    }];
    let auth = ak_auth(&node, "vm-1");
    let before = vkx_guest::tpm::collect_evidence(&tpm.tcti(), &auth, &sel, &[1; 32]).unwrap();
    assert_eq!(
        before.pcr_values[0].values.len(),
        24,
        "read beyond 8 per call"
    );
    assert!(before.ak_cert.is_some());

    let measurement = [0xabu8; 32];
    let o = tool(
        "tpm2_pcrextend",
        &[
            "-T",
            &tpm.tcti(),
            &format!("16:sha256={}", hex::encode(measurement)),
        ],
    );
    assert!(o.status.success(), "tpm2_pcrextend: {}", stderr(&o));

    let after = vkx_guest::tpm::collect_evidence(&tpm.tcti(), &auth, &sel, &[2; 32]).unwrap();
    let old = &before.pcr_values[0].values[&16];
    let mut expected = ring::digest::Context::new(&ring::digest::SHA256);
    expected.update(old);
    expected.update(&measurement);
    assert_eq!(after.pcr_values[0].values[&16], expected.finish().as_ref());
    for i in all.iter().filter(|&&i| i != 16) {
        assert_eq!(
            before.pcr_values[0].values[i],
            after.pcr_values[0].values[i]
        );
    }
    assert_ne!(before.tpm_attest, after.tpm_attest);
}

#[test]
fn unallocated_bank_and_bad_input_are_typed_errors() {
    let node = Node::new();
    let mut tpm = Swtpm::start();
    assert!(node.provision(&tpm, "vm-1", "ecc").status.success());
    // swtpm allocates all four banks; drop sha512 (effective after reset).
    let o = tool(
        "tpm2_pcrallocate",
        &[
            "-T",
            &tpm.tcti(),
            "sha1:all+sha256:all+sha384:all+sha512:none",
        ],
    );
    assert!(o.status.success(), "tpm2_pcrallocate: {}", stderr(&o));
    tpm.restart();
    let err = vkx_guest::tpm::collect_evidence(
        &tpm.tcti(),
        &ak_auth(&node, "vm-1"),
        &[PcrBankSelection {
            hash_alg: HashAlg::Sha512,
            pcrs: vec![0],
        }],
        &[0; 32],
    )
    .unwrap_err();
    assert!(matches!(err, TpmError::PcrBankNotAllocated { .. }), "{err}");
    assert!(err.to_string().contains("tpm2_pcrallocate"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let o = guest_evidence(&tpm, None, "abcd", &["sha256:0"], dir.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("32 bytes"), "{}", stderr(&o));
}

/// Timings on swtpm (printed; run with --nocapture): median of 5 quotes.
#[test]
fn quote_timing() {
    let node = Node::new();
    let tpm = Swtpm::start();
    let o = node.provision(&tpm, "vm-1", "ecc");
    assert!(o.status.success());
    eprintln!("{}", stdout(&o).trim());
    let sel = [PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: vec![0, 1, 7],
    }];
    let auth = ak_auth(&node, "vm-1");
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            vkx_guest::tpm::collect_evidence(&tpm.tcti(), &auth, &sel, &[3; 32]).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    eprintln!(
        "collect_evidence (connect, ReadPublic, NV cert, PCR_Read, Quote) on swtpm: median {:.1} ms; AK cert NV index {AK_CERT_NV_INDEX:#010x}",
        times[2]
    );
}

/// A tpm2-tools command that must fail; returns its stderr.
fn tool_fails(name: &str, args: &[&str], what: &str) -> String {
    let o = tool(name, args);
    assert!(
        !o.status.success(),
        "{what}: {name} succeeded: {}",
        stdout(&o)
    );
    stderr(&o)
}

/// PROTOCOL.md §7.6, §15.7, §15.8 (#13 items 7 and 2): after provisioning,
/// a process in the guest that can open the TPM but does not hold the AK's
/// authValue cannot quote with the AK, cannot derive the AK again under an
/// authValue of its own, and cannot clear the vTPM; the agent, with its
/// ak_auth_file, still attests. tpm2-tools plays the other process.
#[test]
fn only_the_holder_of_the_ak_auth_quotes_and_the_guest_cannot_clear() {
    let node = Node::new();
    let mut tpm = Swtpm::start();
    let o = node.provision(&tpm, "vm-1", "ecc");
    assert!(o.status.success(), "provision: {}", stderr(&o));
    assert!(stdout(&o).contains("AK authValue set"), "{}", stdout(&o));
    let auth_file = node.ak_auth_file("vm-1");
    assert!(stdout(&o).contains(&auth_file), "{}", stdout(&o));
    let auth_hex = std::fs::read_to_string(&auth_file).unwrap();
    let auth_hex = auth_hex.trim();
    assert_eq!(auth_hex.len(), 64);
    tpm.restart(); // the VM boots
    let tcti = tpm.tcti();
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    let ak = format!("{AK_PERSISTENT_HANDLE:#x}");
    let quote = |auth: Option<&str>| {
        let mut args = vec!["-T", &tcti, "-c", &ak, "-l", "sha256:0,7", "-q", NONCE];
        let (m, s) = (p("msg"), p("sig"));
        args.extend(["-m", &m, "-s", &s]);
        let pass;
        if let Some(a) = auth {
            pass = format!("hex:{a}");
            args.extend(["-p", &pass]);
        }
        tool("tpm2_quote", &args)
    };

    // Another process: an empty authorisation is refused by the TPM...
    let o = quote(None);
    assert!(!o.status.success(), "quote with empty auth: {}", stdout(&o));
    // TPM_RC_BAD_AUTH: a failure "without DA implications" (noDA), so no
    // number of tries locks the agent out.
    assert!(
        stderr(&o).to_lowercase().contains("0x9a2"),
        "TPM_RC_BAD_AUTH expected: {}",
        stderr(&o)
    );
    let err = vkx_guest::tpm::collect_evidence(
        &tcti,
        &AkAuth::empty(),
        &[PcrBankSelection {
            hash_alg: HashAlg::Sha256,
            pcrs: vec![0],
        }],
        &[0; 32],
    )
    .unwrap_err();
    assert!(
        matches!(err, TpmError::AkAuthRefused { configured: false }),
        "{err}"
    );
    assert!(err.to_string().contains("ak_auth_file"), "{err}");
    let o = guest_evidence(&tpm, None, NONCE, &["sha256:0"], dir.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ak_auth_file"), "{}", stderr(&o));
    // ... and so is a wrong one.
    let wrong = dir.path().join("wrong-auth");
    std::fs::write(&wrong, format!("{}\n", "00".repeat(32))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o400)).unwrap();
    let err = vkx_guest::tpm::collect_evidence(
        &tcti,
        &AkAuth::load(&wrong).unwrap(),
        &[PcrBankSelection {
            hash_alg: HashAlg::Sha256,
            pcrs: vec![0],
        }],
        &[0; 32],
    )
    .unwrap_err();
    assert!(
        matches!(err, TpmError::AkAuthRefused { configured: true }),
        "{err}"
    );
    // The holder of the value quotes: tpm2-tools with it (the file holds
    // exactly the AK's authValue), and the agent's own code.
    let o = quote(Some(auth_hex));
    assert!(o.status.success(), "quote with the auth: {}", stderr(&o));
    let o = guest_evidence(&tpm, Some(&auth_file), NONCE, &["sha256:0"], dir.path());
    assert!(o.status.success(), "agent evidence: {}", stderr(&o));

    // Deriving the AK again in the endorsement hierarchy, under an
    // authValue of one's own, needs the endorsement auth the host holds.
    let e = tool_fails(
        "tpm2_createprimary",
        &[
            "-T",
            &tcti,
            "-C",
            "e",
            "-G",
            "ecc256:ecdsa-sha256:null",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|sign",
            "-p",
            "mine",
            "-c",
            &p("ak2.ctx"),
        ],
        "CreatePrimary in the endorsement hierarchy",
    );
    assert!(
        e.to_lowercase().contains("0x9a2"),
        "TPM_RC_BAD_AUTH expected: {e}"
    );
    // No clear: lockout auth is the host's, and disableClear is set
    // (TPM2_Clear through the platform hierarchy: TPM_RC_DISABLED).
    let e = tool_fails(
        "tpm2_clear",
        &["-T", &tcti, "-c", "l"],
        "TPM2_Clear (lockout)",
    );
    assert!(
        e.to_lowercase().contains("0x98e"),
        "TPM_RC_AUTH_FAIL expected: {e}"
    );
    let e = tool_fails(
        "tpm2_clear",
        &["-T", &tcti, "-c", "p"],
        "TPM2_Clear (platform)",
    );
    assert!(
        e.to_lowercase().contains("0x120"),
        "TPM_RC_DISABLED expected: {e}"
    );
    tool_fails(
        "tpm2_clearcontrol",
        &["-T", &tcti, "-C", "l", "c"],
        "ClearControl (lockout) without the lockout auth",
    );

    // A re-run is a verified no-op that hardens nothing again.
    let o = node.provision(&tpm, "vm-1", "ecc");
    assert!(o.status.success(), "re-run: {}", stderr(&o));
    assert!(
        stdout(&o).contains("already provisioned (verified)"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("AK authValue set"), "{}", stdout(&o));
    assert_eq!(
        std::fs::read_to_string(&auth_file).unwrap().trim(),
        auth_hex
    );
    // Without the host's copy of the values, provisioning says why.
    let secrets = Path::new(&node.registry()).join("vtpm-auth/vm-1.secrets");
    std::fs::rename(&secrets, dir.path().join("moved")).unwrap();
    let o = node.provision(&tpm, "vm-1", "ecc");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the host holds none for vm vm-1"),
        "{}",
        stderr(&o)
    );
}

/// The upgrade path: a vTPM provisioned before the AK had an authValue
/// (its AK of the old template, without noDA, persisted with an empty
/// authValue; hierarchies open; recorded in the registry) keeps working
/// without an ak_auth_file until provisioning runs again. The re-run
/// recognises that AK, replaces it with the current template's (new name),
/// closes the hierarchies and rewrites the certificate and registry entry.
#[test]
fn a_vtpm_provisioned_without_ak_auth_is_upgraded_by_a_rerun() {
    use tss_esapi::handles::{ObjectHandle, PersistentTpmHandle};
    use tss_esapi::interface_types::dynamic_handles::Persistent;
    use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::PublicBuffer;
    use tss_esapi::traits::Marshall;
    use vkx_host::registry::{EkAlg, Registry, RegistryEntry};
    let node = Node::new();
    let tpm = Swtpm::start();
    // The AK as provisioning persisted it before, and its registry entry.
    let (old_public, old_name) = {
        let template = vkx_host::vtpm::legacy_ak_template(EkAlg::Ecc).unwrap();
        let mut ctx = vkx_host::vtpm::open_context(&tpm.tcti()).unwrap();
        let ak = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .unwrap();
        let (public, name, _) = ctx.read_public(ak.key_handle).unwrap();
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.evict_control(
                Provision::Owner,
                ObjectHandle::from(ak.key_handle),
                Persistent::Persistent(PersistentTpmHandle::new(AK_PERSISTENT_HANDLE).unwrap()),
            )
        })
        .unwrap();
        ctx.flush_context(ObjectHandle::from(ak.key_handle))
            .unwrap();
        let public = PublicBuffer::try_from(public).unwrap().marshall().unwrap();
        (public, name.value().to_vec())
    };
    let old_entry = RegistryEntry {
        vm_id: "vm-1".into(),
        ek_alg: EkAlg::Ecc,
        ek_public: "00".into(),
        ak_public: hex::encode(&old_public),
        ak_name: hex::encode(&old_name),
        ak_cert_sha256: "00".repeat(32),
        created_unix: 17,
        last_quote: None,
    };
    Registry::open(Path::new(&node.registry()))
        .unwrap()
        .insert(&old_entry)
        .unwrap();
    let sel = [PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: vec![0],
    }];
    let before = vkx_guest::tpm::collect_evidence(&tpm.tcti(), &AkAuth::empty(), &sel, &[1; 32])
        .expect("before the re-run, an empty authValue quotes");
    assert_eq!(before.ak_name, old_name);

    let o = node.provision(&tpm, "vm-1", "ecc");
    assert!(o.status.success(), "provision: {}", stderr(&o));
    assert!(stdout(&o).contains("AK replaced"), "{}", stdout(&o));
    assert!(stdout(&o).contains("AK authValue set"), "{}", stdout(&o));
    let entry = node.entry("vm-1");
    assert_ne!(entry["ak_name"], hex::encode(&old_name), "a new AK");
    assert_eq!(entry["created_unix"], 17, "the same VM's entry");
    let err = vkx_guest::tpm::collect_evidence(&tpm.tcti(), &AkAuth::empty(), &sel, &[2; 32])
        .unwrap_err();
    assert!(matches!(err, TpmError::AkAuthRefused { .. }), "{err}");
    // The agent quotes with the AK the registry now records.
    let dir = tempfile::tempdir().unwrap();
    let auth_file = node.ak_auth_file("vm-1");
    let o = guest_evidence(&tpm, Some(&auth_file), NONCE, &["sha256:0"], dir.path());
    assert!(o.status.success(), "evidence: {}", stderr(&o));
    let ak_pub = std::fs::read(dir.path().join("ak.pub")).unwrap();
    assert_eq!(entry["ak_public"], hex::encode(&ak_pub));
    let cert_der = std::fs::read(dir.path().join("ak-cert.der")).unwrap();
    check_ak_cert(&node, &cert_der, "vm-1", &entry);
    tool_fails(
        "tpm2_clear",
        &["-T", &tpm.tcti(), "-c", "l"],
        "TPM2_Clear after the upgrade",
    );
    // Done: a further run changes nothing.
    let o = node.provision(&tpm, "vm-1", "ecc");
    assert!(
        stdout(&o).contains("already provisioned (verified)"),
        "{}",
        stdout(&o)
    );
}
