//! The vkx half of the function-level comparison with Keylime
//! (`make bench-peers`, README "Side by side with Keylime"):
//!
//!     cargo run --release -p vkx-e2e --example peer_quotes -- OUT_DIR [ITERATIONS]
//!
//! 1. Records real quotes: VTPMS swtpm vTPMs, each provisioned by the real
//!    `vkx-host vtpm provision` (ECC P-256 AK, ECDSA-SHA256, a primary of
//!    the endorsement hierarchy), PCRs 0 and 7 of the sha256 bank extended
//!    with tpm2-tools (as firmware would), then quoted by the guest
//!    agent's own `collect_quote` over a random 32-byte nonce, as the
//!    host's challenge asks: sha256 PCRs 0 and 7.
//! 2. Writes `OUT_DIR/cases.json`: the genuine quotes and the tampered
//!    cases derived from the first one, each with what a verifier expects
//!    (nonce, AK, PCR selection, policy). The Keylime side
//!    (`scripts/peers/keylime_quotes.py`) reads the same file.
//! 3. Judges every case with `vkx_common::tpm::verify_quote` (signature,
//!    AK attributes, qualifiedSigner, nonce, selection, PCR digest; no
//!    policy) and with the host's whole evidence path,
//!    `vkx_host::attestation::verify_evidence` (the AK from the registry
//!    file, its name and certificate digest, `verify_quote`, then the PCR
//!    policy), and writes the verdicts to `OUT_DIR/vkx.json`.
//! 4. Times both over the genuine quotes, ITERATIONS verifications
//!    (default 20,000) per repeat, 3 repeats: this thread's CPU time (from
//!    /proc/thread-self/schedstat, in ns, so a machine shared with other
//!    work does not inflate it) per verification; the median repeat goes
//!    to `vkx.json` with all three.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)] // A measuring tool.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use vkx_common::tpm::{AkParent, Public, QuoteExpectations, verify_quote};
use vkx_common::wire::{Evidence, HashAlg, PcrBankSelection, PcrBankValues, VmId};
use vkx_e2e::node::Node;
use vkx_e2e::swtpm::Swtpm;
use vkx_host::attestation::verify_evidence;
use vkx_host::policy::Policy;
use vkx_host::registry::Registry;

/// vTPMs recorded: one quote each.
const VTPMS: usize = 8;
const DEFAULT_ITERATIONS: usize = 20_000;
const REPEATS: usize = 3;
/// The quoted PCRs (sha256 bank), as vkx's tests and the Keylime policy use.
const PCRS: [u8; 2] = [0, 7];
/// What "firmware" extends into PCRs 0 and 7 before the quote.
const PCR0_EVENT: [u8; 32] = [0x11; 32];
const PCR7_EVENT: [u8; 32] = [0x77; 32];

/// One recorded quote.
struct Recorded {
    vm: String,
    ak_public: Vec<u8>,
    nonce: [u8; 32],
    evidence: Evidence,
}

/// One case both verifiers judge.
#[derive(Clone)]
struct Case {
    name: String,
    what: String,
    vm: String,
    attest: Vec<u8>,
    signature: Vec<u8>,
    ak_public: Vec<u8>,
    /// What the verifier expects as qualifying data.
    nonce: Vec<u8>,
    /// The PCR values the agent reports beside the quote.
    pcrs: BTreeMap<u8, Vec<u8>>,
    /// The PCRs the verifier asks for.
    selection: Vec<u8>,
    /// The policy: allowed values per PCR.
    policy: BTreeMap<u8, Vec<u8>>,
    /// Keylime's tpm_policy names no PCR. vkx's policy loader refuses a VM
    /// without PCR rules ("trusted whatever it booted"), so vkx keeps
    /// `policy`.
    no_pcr_rules: bool,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .expect("usage: peer_quotes OUT_DIR [ITERATIONS]"),
    );
    let iterations: usize = args
        .next()
        .map_or(DEFAULT_ITERATIONS, |s| s.parse().expect("ITERATIONS"));
    std::fs::create_dir_all(&out).unwrap();

    let node = Node::new();
    let recorded: Vec<Recorded> = (0..VTPMS).map(|i| record(&node, i)).collect();
    println!(
        "recorded {VTPMS} quotes from {VTPMS} swtpm vTPMs (ECC P-256 AK, ECDSA-SHA256, sha256 PCRs 0,7)"
    );
    let cases = cases(&recorded);
    let registry = Registry::open(Path::new(&node.registry())).unwrap();
    let policies = policies(&cases);

    // Verdicts.
    let mut verdicts = serde_json::Map::new();
    for c in &cases {
        let q = match run_verify_quote(c) {
            Ok(()) => "accept".to_owned(),
            Err(e) => format!("refuse: {e}"),
        };
        let ev = match run_verify_evidence(c, &recorded, &registry, &policies) {
            Ok(()) => "accept".to_owned(),
            Err(e) => format!("refuse: {e}"),
        };
        verdicts.insert(
            c.name.clone(),
            json!({"verify_quote": q, "verify_evidence": ev}),
        );
    }

    // Timing over the genuine quotes.
    let genuine: Vec<&Case> = cases
        .iter()
        .filter(|c| c.name.starts_with("genuine"))
        .collect();
    let time = |f: &dyn Fn(&Case)| -> Vec<f64> {
        (0..REPEATS)
            .map(|_| {
                let start = thread_cpu_ns();
                for i in 0..iterations {
                    f(black_box(genuine[i % genuine.len()]));
                }
                (thread_cpu_ns() - start) as f64 / 1e3 / iterations as f64
            })
            .collect()
    };
    let vq = time(&|c| assert!(run_verify_quote(c).is_ok()));
    let ve = time(&|c| assert!(run_verify_evidence(c, &recorded, &registry, &policies).is_ok()));
    let report = json!({
        "iterations": iterations,
        "repeats": REPEATS,
        "cpu_us_per_verification": {
            "verify_quote": {"median": median(&vq), "runs": vq},
            "verify_evidence": {"median": median(&ve), "runs": ve},
        },
        "verdicts": verdicts,
    });
    std::fs::write(
        out.join("vkx.json"),
        serde_json::to_vec_pretty(&report).unwrap(),
    )
    .unwrap();
    let cases_json: Vec<Value> = cases.iter().map(case_json).collect();
    std::fs::write(
        out.join("cases.json"),
        serde_json::to_vec_pretty(&json!({ "cases": cases_json })).unwrap(),
    )
    .unwrap();
    println!(
        "vkx: verify_quote {:.1} us, verify_evidence {:.1} us CPU per verification (median of {REPEATS} x {iterations}); {} cases judged",
        median(&vq),
        median(&ve),
        cases.len()
    );
}

/// Starts vTPM `i`, provisions it, extends PCRs 0 and 7, quotes once.
/// The swtpm stops when this returns: its quote is recorded.
fn record(node: &Node, i: usize) -> Recorded {
    let tpm = Swtpm::start();
    let vm = format!("vm-{i}");
    let o = node.provision(&tpm, &vm, "ecc");
    assert!(o.status.success(), "provision {vm}: {o:?}");
    for (pcr, event) in [(0, PCR0_EVENT), (7, PCR7_EVENT)] {
        let o = std::process::Command::new("tpm2_pcrextend")
            .args([
                "-T",
                &tpm.tcti(),
                &format!("{pcr}:sha256={}", hex::encode(event)),
            ])
            .output()
            .expect("tpm2_pcrextend (tpm2-tools; make bench-peers installs it)");
        assert!(o.status.success(), "{o:?}");
    }
    let auth = vkx_guest::tpm::AkAuth::load(Path::new(&node.ak_auth_file(&vm))).unwrap();
    let mut nonce = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).unwrap();
    let bundle =
        vkx_guest::tpm::collect_quote(&tpm.tcti(), &auth, &selection(&PCRS), &nonce).unwrap();
    Recorded {
        vm,
        ak_public: bundle.ak_public,
        nonce,
        evidence: bundle.evidence,
    }
}

fn selection(pcrs: &[u8]) -> Vec<PcrBankSelection> {
    vec![PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: pcrs.to_vec(),
    }]
}

fn sha256_bank(ev: &Evidence) -> BTreeMap<u8, Vec<u8>> {
    let bank = ev
        .pcr_values
        .iter()
        .find(|b| b.hash_alg == HashAlg::Sha256)
        .unwrap();
    bank.values.clone()
}

/// The genuine cases (one per vTPM) and the tampered ones, all from the
/// first quote.
fn cases(rec: &[Recorded]) -> Vec<Case> {
    let mut out: Vec<Case> = rec
        .iter()
        .enumerate()
        .map(|(i, r)| Case {
            name: format!("genuine-{i}"),
            what: "the quote as the vTPM made it".into(),
            vm: r.vm.clone(),
            attest: r.evidence.tpm_attest.clone(),
            signature: r.evidence.tpm_signature.clone(),
            ak_public: r.ak_public.clone(),
            nonce: r.nonce.to_vec(),
            pcrs: sha256_bank(&r.evidence),
            selection: PCRS.to_vec(),
            policy: sha256_bank(&r.evidence)
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect(),
            no_pcr_rules: false,
        })
        .collect();
    let base = out[0].clone();
    let tampered = |name: &str, what: &str, f: &dyn Fn(&mut Case)| {
        let mut c = base.clone();
        c.name = name.into();
        c.what = what.into();
        f(&mut c);
        c
    };
    // TPMT_SIGNATURE (ECDSA): sigAlg u16, hash u16, r TPM2B, s TPM2B.
    let r_len = usize::from(u16::from_be_bytes([base.signature[4], base.signature[5]]));
    // TPMS_ATTEST: magic u32, type u16, qualifiedSigner TPM2B, extraData TPM2B, ...
    let qs_len = usize::from(u16::from_be_bytes([base.attest[6], base.attest[7]]));
    let extra_at = 8 + qs_len + 2;
    let attest_len = base.attest.len();
    let other_ak = rec[1].ak_public.clone();
    out.extend([
        tampered(
            "signature-r-bit",
            "one bit of the signature's r flipped",
            &|c| c.signature[6 + r_len / 2] ^= 0x01,
        ),
        tampered(
            "signature-s-bit",
            "one bit of the signature's s flipped",
            &|c| c.signature[6 + r_len + 2 + 3] ^= 0x80,
        ),
        tampered(
            "attest-pcr-digest-bit",
            "one bit of the quoted PCR digest in TPMS_ATTEST flipped",
            &|c| c.attest[attest_len - 1] ^= 0x01,
        ),
        tampered(
            "attest-nonce-bit",
            "one bit of the qualifying data in TPMS_ATTEST flipped",
            &|c| c.attest[extra_at + 5] ^= 0x01,
        ),
        tampered(
            "stale-nonce",
            "genuine quote, the verifier's nonce is another one (a replay)",
            &|c| c.nonce[0] ^= 0xff,
        ),
        tampered(
            "pcr7-value-reported-wrong",
            "the agent reports a PCR 7 value the quote does not cover",
            &|c| c.pcrs.get_mut(&7).unwrap()[31] ^= 0x01,
        ),
        tampered(
            "pcr7-not-in-policy",
            "genuine quote and values; the policy allows another PCR 7 value",
            &|c| c.policy.get_mut(&7).unwrap()[0] ^= 0x01,
        ),
        tampered(
            "pcr1-required-not-quoted",
            "genuine quote of PCRs 0,7; the verifier requires PCR 1 too",
            &|c| {
                c.selection = vec![0, 1, 7];
                c.policy.insert(1, vec![0; 32]);
            },
        ),
        tampered(
            "wrong-ak",
            "genuine quote, checked against another vTPM's AK",
            &|c| {
                c.ak_public = other_ak.clone();
                c.vm = "vm-1".into();
            },
        ),
        // The same two forgeries for a VM whose Keylime policy names no
        // PCR (an agent admitted on its AK alone): the quote checks must
        // refuse them without help from the policy.
        tampered(
            "signature-r-bit/no-pcr-rules",
            "one bit of r flipped; Keylime's tpm_policy names no PCR (vkx refuses such a policy)",
            &|c| {
                c.signature[6 + r_len / 2] ^= 0x01;
                c.no_pcr_rules = true;
            },
        ),
        tampered(
            "wrong-ak/no-pcr-rules",
            "another vTPM's AK; Keylime's tpm_policy names no PCR (vkx refuses such a policy)",
            &|c| {
                c.ak_public = other_ak.clone();
                c.vm = "vm-1".into();
                c.no_pcr_rules = true;
            },
        ),
    ]);
    out
}

/// Each case's policy, for the VM the case names: an image with no rules
/// and the case's PCR rules on the VM.
fn policies(cases: &[Case]) -> BTreeMap<String, Policy> {
    cases
        .iter()
        .map(|c| {
            let mut text = format!(
                "[[image]]\nname = \"img\"\nkeys = [\"disk\"]\n\n[[vm]]\nid = \"{}\"\nimage = \"img\"\n",
                c.vm
            );
            for (index, digest) in &c.policy {
                text += &format!(
                    "\n[[vm.pcr]]\nbank = \"sha256\"\nindex = {index}\nallowed = [\"{}\"]\n",
                    hex::encode(digest)
                );
            }
            (c.name.clone(), Policy::from_toml(&text).unwrap())
        })
        .collect()
}

fn values(c: &Case) -> Vec<PcrBankValues> {
    vec![PcrBankValues {
        hash_alg: HashAlg::Sha256,
        values: c.pcrs.clone(),
    }]
}

fn run_verify_quote(c: &Case) -> Result<(), String> {
    let ak = Public::parse(&c.ak_public).map_err(|e| e.to_string())?;
    verify_quote(
        &c.attest,
        &c.signature,
        &ak,
        &QuoteExpectations {
            ak_parent: AkParent::VKX,
            qualifying_data: &c.nonce,
            pcr_selection: &selection(&c.selection),
            pcr_values: &values(c),
        },
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// The host's path (`verify_evidence`): the registry entry of the VM the
/// transport named (the case's `vm`), the AK name and certificate digest,
/// `verify_quote`, then the case's policy.
fn run_verify_evidence(
    c: &Case,
    rec: &[Recorded],
    registry: &Registry,
    policies: &BTreeMap<String, Policy>,
) -> Result<(), String> {
    let r = rec.iter().find(|r| r.vm == c.vm).unwrap();
    let evidence = Evidence {
        tpm_attest: c.attest.clone(),
        tpm_signature: c.signature.clone(),
        ak_name: r.evidence.ak_name.clone(),
        ak_cert: r.evidence.ak_cert.clone(),
        pcr_values: values(c),
    };
    let nonce: [u8; 32] = c.nonce.as_slice().try_into().unwrap();
    verify_evidence(
        registry,
        &policies[&c.name],
        &VmId::new(&c.vm).unwrap(),
        &nonce,
        &selection(&c.selection),
        &evidence,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn case_json(c: &Case) -> Value {
    let hexmap = |m: &BTreeMap<u8, Vec<u8>>| -> Value {
        m.iter()
            .map(|(k, v)| (k.to_string(), Value::from(hex::encode(v))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    json!({
        "name": c.name,
        "what": c.what,
        "vm": c.vm,
        "attest": hex::encode(&c.attest),
        "signature": hex::encode(&c.signature),
        "ak_public": hex::encode(&c.ak_public),
        "nonce": hex::encode(&c.nonce),
        "pcrs": hexmap(&c.pcrs),
        "selection": c.selection,
        "policy": hexmap(&c.policy),
        "no_pcr_rules": c.no_pcr_rules,
    })
}

/// This thread's CPU time in ns (the first field of schedstat).
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}
