//! `vkx-guest`: the guest agent.
//!
//! In this release it reports its versions and, for debugging, collects TPM
//! evidence into files (`evidence`); attestation (`once`, `run`) arrives
//! with the sessions and transports.

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout)] // A command-line tool prints its results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use vkx_common::wire::{NONCE_LEN, PROTOCOL_VERSION_1};
use vkx_guest::tpm::{self, QuoteBundle};

#[derive(Parser)]
#[command(name = "vkx-guest", version, about = "vkx guest agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the agent and protocol versions.
    /// Attest once against the host and exit: 0 attested, 2 permanent
    /// failure (do not retry), 3 retryable failure.
    Once {
        #[arg(long)]
        config: PathBuf,
    },
    Version,
    /// Debugging: quote the vTPM with the provisioned AK and write the
    /// evidence as files that tpm2-tools can check: attest.bin
    /// (TPMS_ATTEST), signature.bin (TPMT_SIGNATURE), ak.pub
    /// (TPM2B_PUBLIC), pcrs.json (bank -> index -> hex), ak-cert.der.
    Evidence {
        /// TCTI of the TPM; default: $VKX_TPM_TCTI, else device:/dev/tpmrm0.
        #[arg(long)]
        tcti: Option<String>,
        /// Qualifying data: 32 bytes as 64 hex digits.
        #[arg(long)]
        nonce: String,
        /// PCRs to quote, e.g. sha256:0,1,7 (repeat for more banks).
        #[arg(long, required = true)]
        pcrs: Vec<String>,
        /// Directory to write the files to (created if missing).
        #[arg(long)]
        out_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    if let Command::Once { config } = &command {
        return once(config);
    }
    let result = match command {
        Command::Version => {
            println!(
                "vkx-guest {} (protocol versions {PROTOCOL_VERSION_1}..={PROTOCOL_VERSION_1})",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        Command::Once { .. } => Ok(()),
        Command::Evidence {
            tcti,
            nonce,
            pcrs,
            out_dir,
        } => evidence(tcti, &nonce, &pcrs, &out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vkx-guest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn evidence(tcti: Option<String>, nonce: &str, pcrs: &[String], out: &Path) -> anyhow::Result<()> {
    let nonce_bytes = hex::decode(nonce.trim()).context("--nonce is not hex")?;
    let Ok(nonce) = <[u8; NONCE_LEN]>::try_from(nonce_bytes.as_slice()) else {
        bail!("--nonce must be {NONCE_LEN} bytes (64 hex digits)");
    };
    let selection = pcrs
        .iter()
        .map(|p| tpm::parse_pcr_selection(p))
        .collect::<Result<Vec<_>, _>>()?;
    let tcti = tcti.unwrap_or_else(tpm::tcti_from_env);
    let QuoteBundle {
        evidence,
        ak_public,
    } = tpm::collect_quote(&tcti, &selection, &nonce)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))
    };
    write("attest.bin", &evidence.tpm_attest)?;
    write("signature.bin", &evidence.tpm_signature)?;
    write("ak.pub", &ak_public)?;
    let mut banks = serde_json::Map::new();
    for bank in &evidence.pcr_values {
        let values: BTreeMap<String, String> = bank
            .values
            .iter()
            .map(|(i, d)| (i.to_string(), hex::encode(d)))
            .collect();
        banks.insert(bank.hash_alg.name().into(), serde_json::to_value(values)?);
    }
    let mut json = serde_json::to_vec_pretty(&banks)?;
    json.push(b'\n');
    write("pcrs.json", &json)?;
    if let Some(cert) = &evidence.ak_cert {
        write("ak-cert.der", cert)?;
    }
    println!(
        "evidence written to {}: attest {} B, signature {} B, ak name {}, ak cert {}",
        out.display(),
        evidence.tpm_attest.len(),
        evidence.tpm_signature.len(),
        hex::encode(&evidence.ak_name),
        evidence
            .ak_cert
            .as_ref()
            .map_or("absent".to_string(), |c| format!("{} B", c.len())),
    );
    Ok(())
}

fn once(config: &std::path::Path) -> ExitCode {
    let config = match vkx_guest::once::OnceConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vkx-guest: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vkx-guest: start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let outcome = rt.block_on(vkx_guest::once::once(config));
    match &outcome {
        vkx_guest::once::Outcome::Attested {
            session_id,
            reattest_after,
        } => println!(
            "attested: session {}, re-attest within {} s",
            hex::encode(session_id),
            reattest_after.as_secs()
        ),
        vkx_guest::once::Outcome::Permanent(why) => {
            eprintln!("vkx-guest: permanent failure, not retrying: {why}")
        }
        vkx_guest::once::Outcome::Retryable(why) => {
            eprintln!("vkx-guest: failed, retry later: {why}")
        }
    }
    ExitCode::from(outcome.exit_code())
}
