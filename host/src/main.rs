//! `vkx-host`: the host agent (`serve`) and the operator CLI (`init`,
//! `keys`, `vtpm`, `evidence`, `rollout`, `drill`, `derived`, `vsock`,
//! `wire`, ...). Each subcommand parses its arguments and calls the
//! library (`vkx_host::*`); `anyhow` lives only here.

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout)] // A command-line tool prints its results.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use vkx_common::errors::{code_for_decode_error, code_for_frame_error};
use vkx_common::wire::{FrameDecoder, MAX_FRAME_PAYLOAD, Message, PROTOCOL_VERSION_1};
use vkx_host::registry::EkAlg;
use vkx_host::vtpm::{self, ProvisionAction};

/// Largest input `wire decode` reads: a capture of many frames, bounded so
/// a wrong file name cannot exhaust memory.
const MAX_DECODE_INPUT: u64 = 16 * 1024 * 1024;

/// Most frames `wire decode --frames` prints before it stops.
const MAX_DECODE_FRAMES: usize = 10_000;

#[derive(Parser)]
#[command(name = "vkx-host", version, about = "vkx host agent and operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the agent and protocol versions.
    Version,
    /// Print the completion script of SHELL for this command (bash: save
    /// it as /usr/share/bash-completion/completions/vkx-host; the packages
    /// install it).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages, one per command (vkx-host.1, vkx-host-SUB.1, ...), into
    /// DIR, made if missing (for packaging).
    #[command(hide = true)]
    Manpages {
        #[arg(long)]
        out: PathBuf,
    },
    /// Create this node's identity in DIR: the TLS key guests pin
    /// (printed as its SPKI SHA-256) and the vTPM CA (DIR/ca). Refuses to
    /// replace an existing identity.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run the host agent with the given configuration (host.toml) until
    /// SIGTERM or SIGINT. SIGHUP reloads the policy and the CID map.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Wire-format tools.
    #[command(subcommand)]
    Wire(WireCommand),
    /// vTPM provisioning: the node CA, and each VM's EK, AK and AK
    /// certificate before the VM first boots.
    #[command(subcommand)]
    Vtpm(VtpmCommand),
    /// Evidence tools: check a quote given as files with the host's own
    /// verifier (for debugging real quotes in the field).
    #[command(subcommand)]
    Evidence(EvidenceCommand),
    /// vsock diagnostics.
    #[command(subcommand)]
    Vsock(VsockCommand),
    /// The key store: add, generate, rotate, list, verify, remove keys.
    /// A rotation reaches live guests that hold the key within seconds.
    #[command(subcommand)]
    Keys(vkx_host::keys_cli::KeysCommand),
    /// Staged rollout and kill switch (spec/ROLLOUT.md): show, explain,
    /// kill (no key needed), unkill, set-stage, push, sign, keygen.
    #[command(subcommand)]
    Rollout(vkx_host::rollout_cli::RolloutCommand),
    /// Derived shared keys of live sessions (PROTOCOL.md §9).
    #[command(subcommand)]
    Derived(DerivedCommand),
    /// Rehearse a rollout in a sandbox of its own (hosts, etcd, synthetic
    /// guests): prints a timeline and a verdict against the scenario's
    /// SLOs, writes an SVG picture; exit 1 if an SLO is missed.
    Drill(vkx_host::drill::DrillArgs),
    /// Print a running `vkx-host serve`'s metrics (Prometheus text) from
    /// its `[metrics] socket`.
    Metrics {
        #[arg(long)]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum DerivedCommand {
    /// Print the key derived for PURPOSE in VM's live session, raw, to
    /// stdout, fetched from `vkx-host serve`'s local socket (which checks
    /// this process's uid/gid against its allow-list).
    Get {
        /// The `[local] socket` of host.toml.
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        vm_id: String,
        #[arg(long)]
        purpose: String,
    },
}

#[derive(Subcommand)]
enum VsockCommand {
    /// Check that a VM's hybrid-vsock socket (Firecracker, Cloud
    /// Hypervisor, vhost-device-vsock) reaches a listener on guest port P:
    /// performs the CONNECT preamble (PROTOCOL.md §2.3.2), prints the port
    /// the VMM assigned, and closes without sending anything. Exits 0 when
    /// connected, 1 when the VMM refused, 2 on other errors.
    ConnectCheck {
        /// The VMM's socket for the VM (without the `_<port>` suffix).
        #[arg(long)]
        socket: PathBuf,
        /// The guest port.
        #[arg(long, default_value_t = vkx_common::session::transport::VKX_PORT)]
        port: u32,
    },
}

#[derive(Subcommand)]
enum EvidenceCommand {
    /// Print the decoded fields of a quote, its signature and an AK.
    Inspect {
        /// TPMS_ATTEST (`tpm2_quote -m`).
        #[arg(long)]
        attest: PathBuf,
        /// TPMT_SIGNATURE (`tpm2_quote -s`).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// AK public as TPM2B_PUBLIC (`tpm2_createak -u`).
        #[arg(long)]
        ak_public: Option<PathBuf>,
    },
    /// Verify a quote: signature by the AK, qualifying data, PCR selection
    /// and digest; optionally the VM's policy. Exits 0 when verified, 1
    /// when refused (the reason is printed), 2 on unusable input.
    Verify {
        /// TPMS_ATTEST (`tpm2_quote -m`).
        #[arg(long)]
        attest: PathBuf,
        /// TPMT_SIGNATURE (`tpm2_quote -s`).
        #[arg(long)]
        signature: PathBuf,
        /// AK public as TPM2B_PUBLIC. Alternatively --registry and --vm-id.
        #[arg(long, conflicts_with = "registry")]
        ak_public: Option<PathBuf>,
        /// Use the AK recorded for --vm-id in this registry.
        #[arg(long, requires = "vm_id")]
        registry: Option<PathBuf>,
        /// Hex qualified name of the AK's parent, for an AK that is not a
        /// vkx AK (a primary of the endorsement hierarchy): for an AK of
        /// `tpm2_createak`, the EK's (`tpm2_readpublic -c ek.ctx -q FILE`).
        #[arg(long, conflicts_with = "registry")]
        ak_parent_qname: Option<String>,
        /// The VM (for --registry and --policy).
        #[arg(long)]
        vm_id: Option<String>,
        /// PCR values: the digests concatenated in --pcr-list order
        /// (`tpm2_quote -o`, `tpm2_pcrread -o`).
        #[arg(long)]
        pcrs: PathBuf,
        /// The PCR selection, e.g. `sha256:0,1,7+sha1:0`.
        #[arg(long)]
        pcr_list: String,
        /// The expected qualifying data (nonce / transcript hash), hex.
        #[arg(long)]
        nonce: String,
        /// Also check the PCR values against this policy for --vm-id.
        #[arg(long, requires = "vm_id")]
        policy: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum VtpmCommand {
    /// Create the node's vTPM CA (ECDSA P-256 key, self-signed CA
    /// certificate) in DIR. Refuses to overwrite an existing CA.
    CaInit {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Accept a VM's restored TPM state after an intended snapshot restore:
    /// its next quote becomes the baseline rewind detection compares with
    /// (with `on_rewind = "refuse"` a rewound VM is refused until then).
    AcceptRewind {
        #[arg(long)]
        vm_id: String,
        /// The registry directory.
        #[arg(long)]
        registry: PathBuf,
    },
    /// Provision a VM's vTPM: EK and AK persistent, AK certificate in NV,
    /// registry entry. Idempotent; refuses a vTPM or vm-id that belongs to
    /// another VM.
    Provision {
        /// TCTI of the vTPM, e.g. `swtpm:host=127.0.0.1,port=2321` or
        /// `device:/dev/tpmrm0`.
        #[arg(long)]
        tcti: String,
        #[arg(long)]
        vm_id: String,
        /// The registry directory (one JSON file per VM).
        #[arg(long)]
        registry: PathBuf,
        /// The directory made by `vtpm ca-init`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Endorsement key algorithm; the AK uses the same.
        #[arg(long, value_enum, default_value_t = EkArg::Ecc)]
        ek: EkArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EkArg {
    /// ECC NIST P-256 (AK: ECDSA-SHA256).
    Ecc,
    /// RSA 2048 (AK: RSASSA-SHA256).
    Rsa,
}

#[derive(Subcommand)]
enum WireCommand {
    /// Decode captured protocol bytes with the agents' strict decoder and
    /// print a log-safe summary of each message (key material and evidence
    /// bytes are never printed). Exits 1 if anything is refused.
    Decode {
        /// The input is hex text (whitespace ignored), not binary.
        #[arg(long)]
        hex: bool,
        /// The input is a stream of length-prefixed frames, not one
        /// message.
        #[arg(long)]
        frames: bool,
        /// File to read, or `-` for standard input.
        input: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Version => {
            println!(
                "vkx-host {} (protocol versions {PROTOCOL_VERSION_1}..={PROTOCOL_VERSION_1})",
                env!("CARGO_PKG_VERSION")
            );
            Ok(true)
        }
        Command::Completions { shell } => {
            // Built in memory first: clap_complete panics on a failed
            // write (e.g. a closed pipe).
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vkx-host", &mut script);
            std::io::stdout()
                .lock()
                .write_all(&script)
                .context("write the completion script to stdout")
                .map(|()| true)
        }
        Command::Manpages { out } => manpages(&out).map(|()| true),
        Command::Wire(WireCommand::Decode { hex, frames, input }) => decode(&input, hex, frames),
        Command::Init { dir } => vkx_host::node::init(&dir)
            .map(|id| {
                println!("node identity created in {}", dir.display());
                println!(
                    "host key pin (SPKI SHA-256, for guest configs): {}",
                    ::hex::encode(id.host_key_sha256)
                );
                true
            })
            .map_err(anyhow::Error::from),
        Command::Vtpm(cmd) => vtpm(cmd),
        Command::Serve { config } => serve(&config),
        Command::Evidence(cmd) => evidence(cmd),
        Command::Vsock(VsockCommand::ConnectCheck { socket, port }) => connect_check(&socket, port),
        Command::Keys(cmd) => vkx_host::keys_cli::run(cmd)
            .map(|()| true)
            .map_err(anyhow::Error::from),
        Command::Rollout(cmd) => {
            match vkx_host::rollout_cli::run_code(cmd, &mut std::io::stdout().lock()) {
                Ok(0) => Ok(true),
                // `rollout run`'s outcomes (halted, paused, refused, ...).
                Ok(code) => return ExitCode::from(code),
                Err(e) => Err(e.into()),
            }
        }
        Command::Derived(DerivedCommand::Get {
            socket,
            vm_id,
            purpose,
        }) => derived_get(&socket, &vm_id, &purpose),
        Command::Drill(args) => vkx_host::drill::run(&args, &mut std::io::stdout().lock()),
        Command::Metrics { socket } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| Ok(rt.block_on(vkx_host::metrics::fetch(&socket))?))
            .map(|body| {
                print!("{body}");
                true
            }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vkx-host: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn vtpm(cmd: VtpmCommand) -> anyhow::Result<bool> {
    match cmd {
        VtpmCommand::CaInit { dir } => {
            vtpm::ca_init(&dir)?;
            println!(
                "vTPM CA created in {}: {} (keep private), {}",
                dir.display(),
                vtpm::CA_KEY_FILE,
                vtpm::CA_CERT_PEM_FILE
            );
        }
        VtpmCommand::AcceptRewind { vm_id, registry } => {
            let vm =
                vkx_common::wire::VmId::new(&vm_id).map_err(|e| anyhow::anyhow!("--vm-id: {e}"))?;
            let reg = vkx_host::registry::Registry::open(&registry)?;
            if vkx_host::attestation::accept_rewind(&reg, &vm)? {
                println!("vm {vm_id}: TPM clock state forgotten; its next quote is the baseline");
            } else {
                println!("vm {vm_id}: no recorded TPM clock state; nothing to accept");
            }
        }
        VtpmCommand::Provision {
            tcti,
            vm_id,
            registry,
            ca_dir,
            ek,
        } => {
            let ek = match ek {
                EkArg::Ecc => EkAlg::Ecc,
                EkArg::Rsa => EkAlg::Rsa,
            };
            let out = vtpm::provision(&tcti, &vm_id, &registry, &ca_dir, ek)?;
            let action = match out.action {
                ProvisionAction::Created => "provisioned",
                ProvisionAction::AlreadyProvisioned => "already provisioned (verified)",
                ProvisionAction::CertificateRewritten => {
                    "already provisioned; AK certificate rewritten"
                }
                ProvisionAction::AkReplaced => {
                    "provisioned before the AK had an authValue: AK replaced (new name), certificate and registry entry rewritten"
                }
            };
            println!(
                "vm {vm_id}: {action}; ek {} at {:#010x}, ak name {} at {:#010x}, ak cert in nv {:#010x} (ek derive {:.1} ms, ak derive {:.1} ms)",
                ek.as_str(),
                vtpm::ek_persistent_handle(ek),
                ::hex::encode(&out.ak_name),
                vkx_common::tpm::AK_PERSISTENT_HANDLE,
                vkx_common::tpm::AK_CERT_NV_INDEX,
                out.ek_create.as_secs_f64() * 1e3,
                out.ak_create.as_secs_f64() * 1e3,
            );
            if out.hardened_now {
                println!(
                    "vm {vm_id}: AK authValue set; endorsement and lockout auth held by the host, disableClear set"
                );
            }
            println!(
                "vm {vm_id}: install {} in the guest as its ak_auth_file (owner vkx-guest, mode 0400): without it the agent cannot quote",
                out.ak_auth_file.display()
            );
        }
    }
    Ok(true)
}

fn read_input(path: &PathBuf, hex: bool) -> anyhow::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let reader: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?)
    };
    reader
        .take(MAX_DECODE_INPUT + 1)
        .read_to_end(&mut raw)
        .context("read input")?;
    if raw.len() as u64 > MAX_DECODE_INPUT {
        bail!("input larger than {MAX_DECODE_INPUT} bytes");
    }
    if !hex {
        return Ok(raw);
    }
    let text: String = String::from_utf8(raw)
        .context("--hex input is not text")?
        .split_whitespace()
        .collect();
    ::hex::decode(text).context("--hex input is not hex")
}

/// Prints one line per message; returns whether everything was accepted.
fn decode(path: &PathBuf, hex: bool, frames: bool) -> anyhow::Result<bool> {
    let bytes = read_input(path, hex)?;
    if !frames {
        return Ok(print_message(&bytes, None));
    }
    let mut d = FrameDecoder::new();
    let mut rest = &bytes[..];
    let mut ok = true;
    for index in 0..MAX_DECODE_FRAMES {
        match d.decode(&mut rest) {
            Ok(Some(payload)) => ok &= print_message(payload, Some(index)),
            Ok(None) => break,
            Err(e) => {
                println!("frame {index}: refused: {e} [{}]", e.kind());
                print_wire_code(code_for_frame_error(&e));
                return Ok(false);
            }
        }
    }
    if !rest.is_empty() {
        println!("stopped after {MAX_DECODE_FRAMES} frames");
        return Ok(false);
    }
    if let Err(e) = d.finish() {
        println!("end of input: {e} [{}]", e.kind());
        return Ok(false);
    }
    Ok(ok)
}

fn print_message(payload: &[u8], index: Option<usize>) -> bool {
    let prefix = index.map_or(String::new(), |i| format!("frame {i}: "));
    match Message::decode(payload) {
        Ok(m) => {
            println!("{prefix}{} ({} bytes)", m.summary(), payload.len());
            true
        }
        Err(e) => {
            println!(
                "{prefix}refused: {e} [{}] ({} bytes{})",
                e.kind(),
                payload.len(),
                if payload.len() > MAX_FRAME_PAYLOAD {
                    ", over the frame limit"
                } else {
                    ""
                }
            );
            print_wire_code(Some(code_for_decode_error(&e)));
            false
        }
    }
}

fn print_wire_code(code: Option<vkx_common::errors::ErrorCode>) {
    match code {
        Some(c) => println!("  an agent answers: error {c}, then closes"),
        None => println!("  an agent closes the connection"),
    }
}

fn evidence(cmd: EvidenceCommand) -> anyhow::Result<bool> {
    use vkx_host::evidence::{VerifyInputs, describe, parse_ak, read_bounded, verify};
    let read = |p: &PathBuf| read_bounded(p).map_err(anyhow::Error::from);
    match cmd {
        EvidenceCommand::Inspect {
            attest,
            signature,
            ak_public,
        } => {
            let attest = read(&attest)?;
            let signature = signature.as_ref().map(read).transpose()?;
            let ak = match &ak_public {
                Some(p) => Some(parse_ak(&read(p)?).map_err(anyhow::Error::msg)?),
                None => None,
            };
            print!("{}", describe(&attest, signature.as_deref(), ak.as_ref()));
            Ok(true)
        }
        EvidenceCommand::Verify {
            attest,
            signature,
            ak_public,
            registry,
            ak_parent_qname,
            vm_id,
            pcrs,
            pcr_list,
            nonce,
            policy,
        } => {
            let vm_id = vm_id
                .map(|v| {
                    vkx_common::wire::VmId::new(v).map_err(|e| anyhow::anyhow!("--vm-id: {e}"))
                })
                .transpose()?;
            let ak = match (&ak_public, &registry, &vm_id) {
                (Some(p), _, _) => parse_ak(&read(p)?).map_err(anyhow::Error::msg)?,
                (None, Some(dir), Some(vm)) => {
                    let reg = vkx_host::registry::Registry::open(dir)?;
                    vkx_host::attestation::registered_ak(&reg, vm)?
                }
                _ => bail!("give --ak-public FILE, or --registry DIR with --vm-id ID"),
            };
            let policy = policy
                .map(|p| vkx_host::policy::Policy::load(&p))
                .transpose()?;
            let attest = read(&attest)?;
            let signature = read(&signature)?;
            let values = read(&pcrs)?;
            let nonce = ::hex::decode(nonce.trim()).context("--nonce is not hex")?;
            let parent_qname = ak_parent_qname
                .map(|h| ::hex::decode(h.trim()).context("--ak-parent-qname is not hex"))
                .transpose()?;
            let ak_parent = match &parent_qname {
                Some(q) => vkx_common::tpm::AkParent::Key { qualified_name: q },
                None => vkx_common::tpm::AkParent::VKX,
            };
            print!("{}", describe(&attest, Some(&signature), Some(&ak)));
            let inputs = VerifyInputs {
                attest: &attest,
                signature: &signature,
                ak: &ak,
                ak_parent,
                pcr_list: &pcr_list,
                pcr_values: &values,
                nonce: &nonce,
                policy: policy.as_ref().zip(vm_id.as_ref()),
            };
            match verify(&inputs) {
                Ok((quote, _)) => {
                    println!(
                        "VERIFIED: quote by AK {} (reset count {}, restart count {}){}",
                        ::hex::encode(&quote.ak_name),
                        quote.clock_info.reset_count,
                        quote.clock_info.restart_count,
                        if inputs.policy.is_some() {
                            ", policy satisfied"
                        } else {
                            ""
                        }
                    );
                    Ok(true)
                }
                Err(reason) => {
                    println!("REFUSED: {reason}");
                    Ok(false)
                }
            }
        }
    }
}

fn serve(path: &std::path::Path) -> anyhow::Result<bool> {
    let text = vkx_host::config::ServeConfig::read(path)?;
    let config = vkx_host::config::ServeConfig::from_text(path, &text)?;
    let source = vkx_host::reload::Source::new(path.to_path_buf(), &text, &config)?;
    let level = config.log_level.0;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(level)
        .init();
    let threads = config.threads()?;
    let rt = vkx_host::serve::runtime(threads).context("start the async runtime")?;
    rt.block_on(async {
        // SIGHUP reloads the policy and the CID map (`systemctl reload`);
        // caught from here on, before any listener exists.
        let requests = vkx_host::reload::sighup().context("catch SIGHUP")?;
        let reload = vkx_host::reload::Reload { source, requests };
        vkx_host::serve::serve(config, Some(reload), async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
        anyhow::Ok(())
    })?;
    Ok(true)
}

fn connect_check(socket: &std::path::Path, port: u32) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(vkx_host::vsock::connect_check(socket, port)) {
        Ok(assigned) => {
            println!(
                "connected: {} reached guest port {port} (VMM-assigned port {assigned})",
                socket.display()
            );
            Ok(true)
        }
        Err(e @ vkx_host::vsock::HybridConnectError::Reply(_)) => {
            println!("refused: {e}");
            Ok(false)
        }
        // The message already names the cause; the chain would repeat it.
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

fn derived_get(socket: &std::path::Path, vm_id: &str, purpose: &str) -> anyhow::Result<bool> {
    use std::io::Write as _;
    let vm = vkx_common::wire::VmId::new(vm_id).map_err(|e| anyhow::anyhow!("--vm-id: {e}"))?;
    let purpose =
        vkx_common::wire::Purpose::new(purpose).map_err(|e| anyhow::anyhow!("--purpose: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let key = rt.block_on(vkx_host::derive::fetch(socket, &vm, &purpose))?;
    let mut out = std::io::stdout().lock();
    out.write_all(&key)?;
    out.flush()?;
    Ok(true)
}

/// `manpages --out DIR`: one page per command, from the same definitions
/// `--help` prints.
fn manpages(out: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("write the man pages into {}", out.display()))
}
