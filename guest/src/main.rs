//! `vkx-guest`: the guest agent.
//!
//! `run` keeps an attested session as a daemon; `once` attests one time
//! for scripts; `status` shows what the daemon is doing; `evidence`
//! collects TPM evidence into files for debugging.

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
    /// Run as a daemon: keep an attested session with the host, re-attest
    /// when asked, reconnect with bounded, jittered backoff (PROTOCOL.md
    /// §13). Stops with a goodbye on SIGTERM or SIGINT.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Attest once against the host and exit: 0 attested, 2 permanent
    /// failure (do not retry), 3 retryable failure, 4 a key refused.
    Once {
        #[arg(long)]
        config: PathBuf,
        /// Retry retryable failures for up to this many seconds (at most a
        /// day), paced by the [retry] policy (jittered backoff, budget); 0,
        /// the default, makes one attempt. For boot units.
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        retry_for: u64,
    },
    /// Show what the daemon is doing: state, last success, next attempt,
    /// last error (from its status file in the run directory).
    Status {
        #[arg(long)]
        config: PathBuf,
    },
    /// Attest once and print key NAME, raw, to stdout, for scripts:
    /// `vkx-guest get disk --config guest.toml | cryptsetup open --key-file=- ...`.
    /// Exit 0 printed, 2 permanent failure, 3 retryable, 4 refused.
    Get {
        name: String,
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the agent and protocol versions.
    Version,
    /// Print the completion script of SHELL for this command (bash: save
    /// it as /usr/share/bash-completion/completions/vkx-guest; the packages
    /// install it).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages, one per command (vkx-guest.1, vkx-guest-SUB.1, ...), into
    /// DIR, made if missing (for packaging).
    #[command(hide = true)]
    Manpages {
        #[arg(long)]
        out: PathBuf,
    },
    /// Debugging: quote the vTPM with the provisioned AK and write the
    /// evidence as files that tpm2-tools can check: attest.bin
    /// (TPMS_ATTEST), signature.bin (TPMT_SIGNATURE), ak.pub
    /// (TPM2B_PUBLIC), pcrs.json (bank -> index -> hex), ak-cert.der.
    Evidence {
        /// TCTI of the TPM; default: $VKX_TPM_TCTI, else device:/dev/tpmrm0.
        #[arg(long)]
        tcti: Option<String>,
        /// The AK's authValue file (guest.toml's ak_auth_file); default:
        /// an empty authValue.
        #[arg(long)]
        ak_auth_file: Option<PathBuf>,
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
    match &command {
        Command::Once { config, retry_for } => return once(config, *retry_for),
        Command::Run { config } => return run(config),
        Command::Get { name, config } => return get(name, config),
        _ => {}
    }
    let result = match command {
        Command::Version => {
            println!(
                "vkx-guest {} (protocol versions {PROTOCOL_VERSION_1}..={PROTOCOL_VERSION_1})",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        Command::Once { .. } | Command::Run { .. } | Command::Get { .. } => Ok(()),
        Command::Status { config } => status(&config),
        Command::Completions { shell } => completions(shell),
        Command::Manpages { out } => manpages(&out),
        Command::Evidence {
            tcti,
            ak_auth_file,
            nonce,
            pcrs,
            out_dir,
        } => evidence(tcti, ak_auth_file.as_deref(), &nonce, &pcrs, &out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vkx-guest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn evidence(
    tcti: Option<String>,
    ak_auth_file: Option<&Path>,
    nonce: &str,
    pcrs: &[String],
    out: &Path,
) -> anyhow::Result<()> {
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
    } = tpm::collect_quote(
        &tcti,
        &ak_auth_file.map_or_else(|| Ok(tpm::AkAuth::empty()), tpm::AkAuth::load)?,
        &selection,
        &nonce,
    )?;
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

fn logging(level: tracing::Level) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(level)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("vkx-guest: start the async runtime: {e}");
            ExitCode::from(3)
        })
}

fn load(config: &Path) -> Result<vkx_guest::config::Config, ExitCode> {
    vkx_guest::config::Config::load(config).map_err(|e| {
        eprintln!("vkx-guest: {e:#}");
        ExitCode::from(2)
    })
}

fn status(config: &Path) -> anyhow::Result<()> {
    let config = vkx_guest::config::Config::load(config)?;
    let s = vkx_guest::status::read(&config.run_dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    print!("{}", vkx_guest::status::render(&s, now));
    Ok(())
}

/// Runs `work` with a stop flag that SIGTERM or SIGINT raises, and waits
/// for it to wind down and return once it sees the flag.
async fn stop_on_signal<F: std::future::Future>(
    work: impl FnOnce(tokio::sync::watch::Receiver<bool>) -> F,
) -> F::Output {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let work = work(stop_rx);
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => out,
        () = terminated() => {
            let _ = stop_tx.send(true);
            work.await
        }
    }
}

/// Resolves on SIGTERM or SIGINT (never, if the handler cannot be set).
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn run(config: &Path) -> ExitCode {
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging(config.log_level);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(stop_on_signal(|stop| vkx_guest::daemon::run(config, stop)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vkx-guest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn get(name: &str, config: &Path) -> ExitCode {
    use std::io::Write as _;
    let Ok(name) = vkx_common::wire::KeyName::new(name) else {
        eprintln!("vkx-guest: {name:?} is not a key name");
        return ExitCode::from(2);
    };
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging(config.log_level);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let outcome = rt.block_on(vkx_guest::get::get(config, name));
    match &outcome {
        vkx_guest::get::GetOutcome::Key(material) => {
            use std::os::fd::AsFd;
            let out = std::io::stdout();
            if out
                .lock()
                .flush()
                .and_then(|()| vkx_guest::get::write_key(out.as_fd(), material))
                .is_err()
            {
                eprintln!("vkx-guest: could not write the key to stdout");
                return ExitCode::from(3);
            }
        }
        vkx_guest::get::GetOutcome::Refused(code) => {
            eprintln!(
                "vkx-guest: the host refused the key: {}",
                vkx_guest::deliver::describe_refusal(vkx_common::wire::feature::KEY_RELEASE, *code)
            )
        }
        vkx_guest::get::GetOutcome::Permanent(why) => {
            eprintln!("vkx-guest: permanent failure, not retrying: {why}")
        }
        vkx_guest::get::GetOutcome::Retryable(why) => {
            eprintln!("vkx-guest: failed, retry later: {why}")
        }
    }
    ExitCode::from(outcome.exit_code())
}

fn once(config: &Path, retry_for: u64) -> ExitCode {
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging(config.log_level);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let retry_for = std::time::Duration::from_secs(retry_for);
    if retry_for > vkx_guest::once::MAX_RETRY_FOR {
        eprintln!(
            "vkx-guest: --retry-for is at most {} s",
            vkx_guest::once::MAX_RETRY_FOR.as_secs()
        );
        return ExitCode::from(2);
    }
    let outcome = rt.block_on(async {
        if retry_for.is_zero() {
            return vkx_guest::once::once(config).await;
        }
        stop_on_signal(|stop| vkx_guest::once::once_retrying(config, retry_for, stop))
            .await
            .0
    });
    match &outcome {
        vkx_guest::once::Outcome::Attested {
            session_id,
            reattest_after,
            keys,
        } => {
            println!(
                "attested: session {}, re-attest within {} s",
                hex::encode(session_id),
                reattest_after.as_secs()
            );
            for (name, version) in keys {
                println!("key delivered: {name} version {version}");
            }
        }
        vkx_guest::once::Outcome::KeysMissing(why) => {
            eprintln!("vkx-guest: attested, but keys are missing: {why}")
        }
        vkx_guest::once::Outcome::Permanent(why) => {
            eprintln!("vkx-guest: permanent failure, not retrying: {why}")
        }
        vkx_guest::once::Outcome::Retryable(why) => {
            eprintln!("vkx-guest: failed, retry later: {why}")
        }
    }
    ExitCode::from(outcome.exit_code())
}

/// `completions SHELL`: the script, to stdout (built in memory first:
/// clap_complete panics on a failed write, e.g. a closed pipe).
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use clap::CommandFactory;
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "vkx-guest", &mut script);
    std::io::stdout()
        .lock()
        .write_all(&script)
        .context("write the completion script to stdout")
}

/// `manpages --out DIR`: one page per command, from the same definitions
/// `--help` prints.
fn manpages(out: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("write the man pages into {}", out.display()))
}
