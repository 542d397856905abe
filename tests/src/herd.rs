//! The set-up shared by the load generator (`examples/storm.rs`) and the
//! reconnect-herd case of the fault-injection suite (`tests/chaos_cd.rs`,
//! case c): a node whose N VMs each have a soft vTPM
//! ([`crate::softtpm`]) enrolled in its registry, a policy granting
//! [`KEY`] to their image, the key in the node's key store, one Unix
//! socket per VM, and `vkx-host serve` started (and restarted) on it as its
//! own process.
//!
//! Only with the `insecure-soft-tpm` feature.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vkx_common::wire::HashAlg;
use vkx_guest::agent::Agent as GuestAgent;
use vkx_guest::config::Config;

use crate::agents::Agent as Process;
use crate::node::Node;
use crate::softtpm::{Seed, SoftTpm};

pub use crate::ensure_fd_limit;

/// The key every VM asks for, and the image that is granted it.
pub const KEY: &str = "storm-key";
pub const IMAGE: &str = "storm-img";
/// The PCRs the policy constrains (sha256 bank): what the host asks for.
pub const POLICY_PCRS: [u8; 2] = [0, 7];
/// The most VMs of one site: one Unix listener each, and the host serves
/// at most `vkx_host::config::MAX_LISTENERS`.
pub const MAX_VMS: usize = vkx_host::config::MAX_LISTENERS;
/// Longest wait for the host to bind every socket.
const HOST_START_LIMIT: Duration = Duration::from_secs(60);
/// Connections the host admits beyond N.
const CONNECTION_HEADROOM: usize = 64;
const POLL: Duration = Duration::from_millis(20);

/// Guest config for a VM reached on `socket`.
pub fn guest_config(socket: &Path, pin: &str, tcti: Option<&str>) -> Config {
    let mut text = format!(
        "host_socket = \"{}\"\nhost_key_sha256 = \"{pin}\"\n",
        socket.display()
    );
    if let Some(t) = tcti {
        text += &format!("tcti = \"{t}\"\n");
    }
    Config::from_toml(&text).unwrap()
}

/// One node's VMs: policy, key, socket paths; hosts are started on it.
#[derive(Debug)]
pub struct Site {
    pub node: Node,
    pub vm_ids: Vec<String>,
    pub sockets: Vec<PathBuf>,
    pub policy: PathBuf,
    pub work: tempfile::TempDir,
    _socket_dir: tempfile::TempDir,
}

/// A running `vkx-host serve`.
#[derive(Debug)]
pub struct Host {
    pub process: Process,
    pub pid: u32,
}

impl Site {
    /// Writes the policy for `vm_ids` (the image's PCR rules are
    /// `image_pcrs`; `vm_pcrs[i]`, if given, are VM i's `[[vm.pcr]]`) and
    /// puts [`KEY`] in the node's key store for [`IMAGE`].
    pub fn new(node: Node, vm_ids: Vec<String>, image_pcrs: &str, vm_pcrs: &[String]) -> Self {
        let work = tempfile::tempdir().unwrap();
        // Unix socket paths are limited to 107 bytes: a short directory.
        let socket_dir = tempfile::Builder::new()
            .prefix("vkx")
            .tempdir_in("/tmp")
            .unwrap();
        let mut policy =
            format!("[[image]]\nname = \"{IMAGE}\"\nkeys = [\"{KEY}\"]\n{image_pcrs}\n");
        for (i, vm) in vm_ids.iter().enumerate() {
            policy += &format!("[[vm]]\nid = \"{vm}\"\nimage = \"{IMAGE}\"\n");
            if let Some(p) = vm_pcrs.get(i) {
                policy += p;
            }
        }
        let policy_path = work.path().join("policy.toml");
        std::fs::write(&policy_path, policy).unwrap();
        let o = crate::run(
            "vkx-host",
            &[
                "keys",
                "generate",
                KEY,
                "--node-dir",
                &node.node_dir(),
                "--allow-image",
                IMAGE,
            ],
            b"",
        );
        assert!(
            o.status.success(),
            "vkx-host keys generate: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let sockets = (0..vm_ids.len())
            .map(|i| socket_dir.path().join(format!("{i}.sock")))
            .collect();
        Self {
            node,
            vm_ids,
            sockets,
            policy: policy_path,
            work,
            _socket_dir: socket_dir,
        }
    }

    /// Writes host-`name`.toml (`admission` is its `[admission]` table, or
    /// empty for the defaults), starts `vkx-host serve` and waits until it
    /// listens on every socket.
    pub fn start_host(&self, name: &str, admission: &str) -> Host {
        let mut toml = format!(
            "node_dir = \"{}\"\nregistry = \"{}\"\npolicy = \"{}\"\nmax_connections = {}\n{admission}\n",
            self.node.node_dir(),
            self.node.registry(),
            self.policy.display(),
            (self.vm_ids.len() + CONNECTION_HEADROOM).min(65_536),
        );
        for (socket, vm) in self.sockets.iter().zip(&self.vm_ids) {
            toml += &format!(
                "\n[[unix_listener]]\npath = \"{}\"\nvm_id = \"{vm}\"\n",
                socket.display()
            );
            let _ = std::fs::remove_file(socket);
        }
        let config = self.work.path().join(format!("host-{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let process = Process::spawn(
            "vkx-host",
            &["serve", "--config", &config.display().to_string()],
            self.work.path().join(format!("host-{name}.log")),
        );
        let pid = process.pid();
        let start = Instant::now();
        while !self.sockets.iter().all(|s| s.exists()) {
            assert!(
                start.elapsed() < HOST_START_LIMIT,
                "the host did not listen on all {} sockets: {}",
                self.sockets.len(),
                process.log()
            );
            std::thread::sleep(POLL);
        }
        Host { process, pid }
    }
}

impl Host {
    /// Stops the host (SIGTERM: goodbye to every session) and asserts it
    /// exited cleanly; with `show_tail`, prints the end of its log first.
    pub fn stop(self, show_tail: bool) {
        if show_tail {
            let log = self.process.log();
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            eprintln!("host log (last lines):");
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
        let status = self.process.stop();
        assert!(status.success(), "vkx-host serve exited with {status}");
    }
}

/// How a guest's attempt failed, without what differs per guest (its
/// socket path, the `retry-after` it got): what a herd's failures are
/// grouped by in a report.
pub fn failure_cause(detail: &str) -> String {
    let detail = detail.split(" (").next().unwrap_or(detail);
    match detail.strip_prefix("connect ") {
        Some(rest) => format!("connect: {}", rest.rsplit(": ").next().unwrap_or(rest)),
        None => detail.to_owned(),
    }
}

/// A site of `n` VMs named `<prefix>-NNNN`, each with its own soft vTPM
/// enrolled in the registry, the policy constraining [`POLICY_PCRS`] to
/// the soft TPM's values.
#[derive(Debug)]
pub struct SoftSite {
    pub site: Site,
    pub tpms: Vec<Arc<SoftTpm>>,
    /// How long deriving and enrolling took, and the registry's file system.
    pub note: String,
}

impl SoftSite {
    pub fn new(n: usize, prefix: &str) -> Self {
        assert!((1..=MAX_VMS).contains(&n), "1..={MAX_VMS} VMs per site");
        let node = Node::new();
        let registry = vkx_host::registry::Registry::open(Path::new(&node.registry())).unwrap();
        let t = Instant::now();
        // A seed per site: its AKs are its own (see the soft TPM's primer).
        let seed = Seed::generate().unwrap();
        let tpms: Vec<Arc<SoftTpm>> = (0..n)
            .map(|i| Arc::new(SoftTpm::new(&seed, u32::try_from(i).unwrap())))
            .collect();
        let vm_ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
        for (tpm, vm) in tpms.iter().zip(&vm_ids) {
            vkx_host::enroll::enroll_simulated_vm(&registry, vm, tpm.ek_public(), tpm.ak_public())
                .unwrap();
        }
        let note = format!(
            "{n} soft vTPMs derived and enrolled in {:.1} s; registry on {}",
            t.elapsed().as_secs_f64(),
            filesystem(Path::new(&node.registry()))
        );
        let mut image_pcrs = String::new();
        for i in POLICY_PCRS {
            image_pcrs += &format!(
                "[[image.pcr]]\nbank = \"sha256\"\nindex = {i}\nallowed = [\"{}\"]\n",
                hex::encode(SoftTpm::pcr_value(HashAlg::Sha256, i))
            );
        }
        let site = Site::new(node, vm_ids, &image_pcrs, &[]);
        Self { site, tpms, note }
    }

    /// One guest agent per VM, quoting with its soft vTPM.
    pub fn agents(&self) -> Vec<Arc<GuestAgent>> {
        self.site
            .sockets
            .iter()
            .zip(&self.tpms)
            .map(|(socket, tpm)| {
                Arc::new(
                    GuestAgent::new(&guest_config(socket, self.site.node.pin(), None))
                        .unwrap()
                        .with_quoter(tpm.clone()),
                )
            })
            .collect()
    }
}

/// The file system `path` is on (`stat -f`): the registry's fsyncs are
/// part of every attestation.
pub fn filesystem(path: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|t| format!("{} ({})", path.display(), t.trim()))
        .unwrap_or_else(|| path.display().to_string())
}
