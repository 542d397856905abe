//! Measures the guest's evidence collection on swtpm (connect, read AK,
//! read the AK certificate from NV, read PCRs, quote), as the closing
//! figures of the TPM work quote it:
//!
//!     cargo run --release -p vkx-e2e --example quote_timing
//!
//! Starts its own swtpm and provisions it with the real `vkx-host`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation
)] // A measuring tool.

use std::time::Instant;

use vkx_common::wire::{HashAlg, PcrBankSelection};
use vkx_e2e::node::Node;
use vkx_e2e::swtpm::Swtpm;

const RUNS: usize = 50;

fn main() {
    for ek in ["ecc", "rsa"] {
        let node = Node::new();
        let tpm = Swtpm::start();
        assert!(node.provision(&tpm, "vm-t", ek).status.success());
        let auth =
            vkx_guest::tpm::AkAuth::load(std::path::Path::new(&node.ak_auth_file("vm-t"))).unwrap();
        let selection = vec![PcrBankSelection {
            hash_alg: HashAlg::Sha256,
            pcrs: (0..8).collect(),
        }];
        let mut times: Vec<f64> = (0..RUNS)
            .map(|i| {
                let th = [i as u8; 32];
                let t = Instant::now();
                vkx_guest::tpm::collect_evidence(&tpm.tcti(), &auth, &selection, &th).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{ek}: evidence (8 PCRs, quote, AK cert) over {RUNS} runs: median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
            times[RUNS / 2],
            times[RUNS * 9 / 10],
            times[RUNS - 1]
        );
    }
}
