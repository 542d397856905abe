//! A drill's sandbox: everything a rehearsed rollout runs on, made for
//! the drill and removed after it. A temporary root under `/tmp` (short,
//! for Unix socket paths) holding: the sandbox's own etcd on loopback
//! (or a `--etcd` endpoint, used only below a drill prefix of its own),
//! one directory per node with its identity (`vkx-host init`), registry,
//! key store, policy and host.toml, and N real `vkx-host serve` processes
//! (this very binary, [`std::env::current_exe`]), each serving its VMs on
//! one Unix socket per VM (never AF_VSOCK). The rollout document is
//! signed with a key made for the sandbox and written, read and admitted
//! by the real `vkx-host rollout` commands and hosts.
//!
//! What it trusts: the `etcd` binary on `PATH` and the endpoint given with
//! `--etcd` (written only below [`Sandbox::prefix`]).
//!
//! What it bounds: nodes ([`MAX_NODES`]) and VMs per node
//! ([`crate::config::MAX_LISTENERS`]), every wait (host and etcd start,
//! child exit), and where soft vTPMs are enrolled: only in a registry of
//! this sandbox ([`Sandbox::enroll`] refuses any other directory), with
//! keys from the sandbox's random [`Seed`].

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use vkx_common::wire::{HashAlg, VmId};

use super::softtpm::{Seed, SoftTpm};
use crate::rollout::{Feature, bucket};

/// Most nodes of one sandbox: each is a `vkx-host serve` process.
pub const MAX_NODES: usize = 16;
/// The key every synthetic guest asks for, its image and the derivation
/// purpose it uses.
pub const KEY: &str = "drill-key";
pub const IMAGE: &str = "drill-img";
pub const PURPOSE: &str = "drill:v1";
/// The signing key's id in every host.toml of the sandbox.
pub const KEY_ID: &str = "drill";
/// The PCRs the policy constrains (sha256 bank).
pub const POLICY_PCRS: [u8; 2] = [0, 7];
/// The rings of the drill's document, in order, with their bucket
/// thresholds (the canary selects by VM id).
pub const RINGS: [(&str, Option<u32>); 5] = [
    ("canary", None),
    ("1pct", Some(100)),
    ("10pct", Some(1000)),
    ("50pct", Some(5000)),
    ("all", Some(10_000)),
];
/// Longest wait for a host to listen on all its sockets.
const HOST_START_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for etcd to answer `/health`.
const ETCD_START_LIMIT: Duration = Duration::from_secs(15);
/// How long a child gets after SIGTERM before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// Candidate VM ids scanned to fill the rings' quotas: the 1 % ring
/// takes one candidate in a hundred.
const MAX_CANDIDATES: usize = 1_000_000;
/// Connections each host admits beyond its VMs.
const CONNECTION_HEADROOM: usize = 64;
/// The marker file of a sandbox root, holding its id.
const MARKER: &str = "VKX-DRILL-SANDBOX";
const POLL: Duration = Duration::from_millis(20);

/// The shape of a sandbox.
#[derive(Debug, Clone)]
pub struct Spec {
    pub nodes: usize,
    /// Guests per ring, in [`RINGS`] order (canary first).
    pub ring_guests: [usize; 5],
    /// The feature the drill rolls out.
    pub feature: Feature,
    /// The health publisher's interval (`None`: the hosts' default).
    pub health_interval_ms: Option<u64>,
    /// An etcd to use (below a drill prefix) instead of the sandbox's own.
    pub external_etcd: Option<String>,
}

/// One VM of the sandbox.
#[derive(Debug, Clone)]
pub struct Vm {
    pub id: String,
    pub node: usize,
    /// Its ring index in [`RINGS`].
    pub ring: usize,
    pub socket: PathBuf,
    pub tpm: Arc<SoftTpm>,
}

/// One node: its files and, once started, its `vkx-host serve`.
#[derive(Debug)]
pub struct NodeBox {
    pub name: String,
    pub dir: PathBuf,
    pub node_dir: PathBuf,
    pub registry: PathBuf,
    pub config: PathBuf,
    pub metrics: PathBuf,
    pub log: PathBuf,
    pub pin: String,
    host: Option<Child>,
}

/// The sandbox's etcd: its own child, or a given endpoint.
#[derive(Debug)]
enum Store {
    Own {
        child: Option<Child>,
        data: PathBuf,
        client_port: u16,
        peer_port: u16,
        log: PathBuf,
    },
    External(String),
}

/// A running sandbox; dropping it stops every process it started and
/// removes its files.
#[derive(Debug)]
pub struct Sandbox {
    /// `None` once kept ([`Sandbox::keep`]).
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    id: String,
    exe: PathBuf,
    pub seed: Seed,
    store: Store,
    pub nodes: Vec<NodeBox>,
    pub vms: Vec<Vm>,
    pub key_file: PathBuf,
    pub feature: Feature,
}

impl Sandbox {
    /// Makes the sandbox: root, seed, etcd, signing key, nodes with their
    /// VMs enrolled, the initial document (the feature at stage `none`).
    /// Hosts are not started yet ([`Sandbox::start_hosts`]).
    pub fn create(spec: &Spec) -> anyhow::Result<Self> {
        ensure!(
            (1..=MAX_NODES).contains(&spec.nodes),
            "1 to {MAX_NODES} nodes"
        );
        let exe = std::env::current_exe().context("this binary's path")?;
        let root = tempfile::Builder::new()
            .prefix("vkxd")
            .tempdir_in("/tmp")
            .context("sandbox root")?;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700))?;
        let seed = Seed::generate().map_err(|_| anyhow::anyhow!("no randomness"))?;
        let mut idb = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut idb)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let id = hex::encode(idb);
        std::fs::write(root.path().join(MARKER), &id)?;
        let store = match &spec.external_etcd {
            Some(url) => Store::External(url.clone()),
            None => Store::start_own(&root.path().join("etcd"))?,
        };
        let mut sb = Self {
            key_file: root.path().join("release.key"),
            root_path: root.path().to_owned(),
            root: Some(root),
            id,
            exe,
            seed,
            store,
            nodes: Vec::new(),
            vms: Vec::new(),
            feature: spec.feature,
        };
        let public = sb.keygen()?;
        sb.plan_vms(spec)?;
        for n in 0..spec.nodes {
            let node = sb.make_node(n, spec, &public)?;
            sb.nodes.push(node);
        }
        sb.push_initial()?;
        Ok(sb)
    }

    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// Where the drill's keys live in etcd: below this, nothing else.
    pub fn prefix(&self) -> String {
        format!("/vkx-drill/{}", self.id)
    }

    pub fn rollout_key(&self) -> String {
        format!("{}/rollout", self.prefix())
    }

    pub fn health_prefix(&self) -> String {
        format!("{}/health", self.prefix())
    }

    pub fn etcd_endpoint(&self) -> String {
        match &self.store {
            Store::Own { client_port, .. } => format!("http://127.0.0.1:{client_port}"),
            Store::External(url) => url.clone(),
        }
    }

    /// The ring names of the drill's document.
    pub fn ring_names() -> Vec<&'static str> {
        RINGS.iter().map(|(n, _)| *n).collect()
    }

    /// Enrols `tpm` as VM `vm_id` in `registry`, which must be a registry
    /// of this sandbox: soft AKs go nowhere else.
    pub fn enroll(&self, registry: &Path, vm_id: &str, tpm: &SoftTpm) -> anyhow::Result<()> {
        let own = registry.starts_with(&self.root_path)
            && std::fs::read_to_string(self.root_path.join(MARKER))
                .ok()
                .as_deref()
                == Some(self.id.as_str());
        ensure!(
            own,
            "{} is not a registry of this drill's sandbox: soft vTPMs are enrolled only there",
            registry.display()
        );
        let reg = crate::registry::Registry::open(registry)?;
        crate::enroll::enroll_simulated_vm(&reg, vm_id, tpm.ek_public(), tpm.ak_public())?;
        Ok(())
    }

    /// This binary with `args` (rollout steps run off the guests' thread).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args).stdin(Stdio::null());
        c
    }

    /// `vkx-host rollout kill FEATURE --config <node 0>`: unsigned.
    pub fn kill_command(&self) -> Command {
        let cfg = self.nodes[0].config.display().to_string();
        self.command(&["rollout", "kill", self.feature.name(), "--config", &cfg])
    }

    /// `vkx-host rollout set-stage FEATURE STAGE`, signed with the
    /// sandbox's key.
    pub fn set_stage_command(&self, stage: &str) -> Command {
        let cfg = self.nodes[0].config.display().to_string();
        let key = self.key_file.display().to_string();
        self.command(&[
            "rollout",
            "set-stage",
            self.feature.name(),
            stage,
            "--config",
            &cfg,
            "--key",
            &key,
            "--key-id",
            KEY_ID,
        ])
    }

    /// Runs this binary with `args`; its output.
    pub fn vkx(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&self.exe)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run vkx-host {}", args.first().unwrap_or(&"")))
    }

    /// The same, which must succeed; its stdout.
    pub fn vkx_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = self.vkx(args)?;
        if !o.status.success() {
            bail!(
                "vkx-host {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `vkx-host rollout ARGS --config <node 0's host.toml>`.
    pub fn rollout(&self, args: &[&str]) -> anyhow::Result<String> {
        let cfg = self.nodes[0].config.display().to_string();
        let mut all = vec!["rollout"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", &cfg]);
        self.vkx_ok(&all)
    }

    /// The signed widening of the feature to `stage` (a ring or `none`).
    pub fn set_stage(&self, stage: &str) -> anyhow::Result<String> {
        let key = self.key_file.display().to_string();
        self.rollout(&[
            "set-stage",
            self.feature.name(),
            stage,
            "--key",
            &key,
            "--key-id",
            KEY_ID,
        ])
    }

    /// The unsigned kill of the feature, through the store.
    pub fn kill(&self) -> anyhow::Result<String> {
        self.rollout(&["kill", self.feature.name()])
    }

    /// The kill of the feature in node `n`'s override file only.
    pub fn kill_local(&self, n: usize) -> anyhow::Result<String> {
        let cfg = self.nodes[n].config.display().to_string();
        self.vkx_ok(&[
            "rollout",
            "kill",
            self.feature.name(),
            "--local",
            "--config",
            &cfg,
        ])
    }

    /// Starts every node's `vkx-host serve` and waits until each listens
    /// on all its sockets and its metrics socket.
    pub fn start_hosts(&mut self) -> anyhow::Result<()> {
        for n in 0..self.nodes.len() {
            self.start_host(n)?;
        }
        Ok(())
    }

    fn start_host(&mut self, n: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[n];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&self.exe)
            .args(["serve", "--config"])
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn vkx-host serve")?;
        node.host = Some(child);
        let sockets: Vec<&PathBuf> = self
            .vms
            .iter()
            .filter(|v| v.node == n)
            .map(|v| &v.socket)
            .collect();
        let node = &mut self.nodes[n];
        let start = Instant::now();
        while !(sockets.iter().all(|s| s.exists()) && node.metrics.exists()) {
            if let Some(c) = node.host.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "{}'s vkx-host serve exited with {status}: {}",
                    node.name,
                    tail(&node.log, 10)
                );
            }
            ensure!(
                start.elapsed() < HOST_START_LIMIT,
                "{}'s host did not listen within {HOST_START_LIMIT:?}",
                node.name
            );
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Stops every host (SIGTERM, then SIGKILL).
    pub fn stop_hosts(&mut self) {
        for node in &mut self.nodes {
            if let Some(c) = node.host.take() {
                stop_child(c);
            }
        }
    }

    /// Kills the sandbox's own etcd (a crash); `false` for a given one.
    pub fn kill_etcd(&mut self) -> bool {
        match &mut self.store {
            Store::Own { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                true
            }
            Store::External(_) => false,
        }
    }

    /// Starts the sandbox's own etcd again on its data and ports.
    pub fn restart_etcd(&mut self) -> anyhow::Result<()> {
        if let Store::Own { .. } = self.store {
            self.store.launch()?;
        }
        Ok(())
    }

    /// Lines of node `n`'s host log from byte `from` on, and the new end.
    pub fn host_log_since(&self, n: usize, from: u64) -> (Vec<String>, u64) {
        let bytes = std::fs::read(&self.nodes[n].log).unwrap_or_default();
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
        let lines = String::from_utf8_lossy(&bytes[start..])
            .lines()
            .map(str::to_owned)
            .collect();
        (lines, u64::try_from(bytes.len()).unwrap_or(u64::MAX))
    }

    /// Keeps the sandbox's files (for a post-mortem) instead of removing
    /// them when it is dropped; returns the root.
    pub fn keep(&mut self) -> PathBuf {
        if let Some(root) = self.root.take() {
            let _ = root.keep();
        }
        self.root_path.clone()
    }

    // ----------------------------------------------------------- set-up

    fn keygen(&self) -> anyhow::Result<String> {
        let out = self.vkx_ok(&[
            "rollout",
            "keygen",
            "--out",
            &self.key_file.display().to_string(),
            "--key-id",
            KEY_ID,
        ])?;
        out.lines()
            .find_map(|l| l.strip_prefix("public_key = \""))
            .and_then(|l| l.strip_suffix('"'))
            .map(str::to_owned)
            .context("rollout keygen printed no public key")
    }

    /// Picks VM ids so that each ring gets its quota (at drill scale the
    /// real proportions would leave the 1 % ring empty), spreads each ring
    /// over the nodes, and derives each VM's soft vTPM from the seed.
    fn plan_vms(&mut self, spec: &Spec) -> anyhow::Result<()> {
        let mut left = spec.ring_guests;
        let mut per_ring: Vec<Vec<String>> = vec![Vec::new(); RINGS.len()];
        for (ring, quota) in left.iter_mut().enumerate().take(1) {
            for k in 0..*quota {
                per_ring[ring].push(format!("canary-{k:03}"));
            }
            *quota = 0;
        }
        let mut k = 0usize;
        while left.iter().any(|q| *q > 0) {
            ensure!(k < MAX_CANDIDATES, "no VM ids fill the rings' quotas");
            let id = format!("vm-{k:06}");
            k += 1;
            let b = bucket(&VmId::new(&id).map_err(|e| anyhow::anyhow!("{e}"))?);
            let ring = RINGS
                .iter()
                .skip(1)
                .position(|(_, below)| below.is_some_and(|x| b < x))
                .map_or(RINGS.len() - 1, |i| i + 1);
            if left[ring] > 0 {
                left[ring] -= 1;
                per_ring[ring].push(id);
            }
        }
        let mut index = 0u32;
        for (ring, ids) in per_ring.into_iter().enumerate() {
            for id in ids {
                let node = usize::try_from(index).unwrap_or(0) % spec.nodes;
                let socket = self
                    .root_path
                    .join(format!("n{node}"))
                    .join("s")
                    .join(format!("{index}.sock"));
                self.vms.push(Vm {
                    id,
                    node,
                    ring,
                    socket,
                    tpm: Arc::new(SoftTpm::new(&self.seed, index)),
                });
                index += 1;
            }
        }
        Ok(())
    }

    fn make_node(&self, n: usize, spec: &Spec, public: &str) -> anyhow::Result<NodeBox> {
        let dir = self.root_path.join(format!("n{n}"));
        std::fs::create_dir_all(dir.join("s"))?;
        let node_dir = dir.join("node");
        let out = self.vkx_ok(&["init", "--dir", &node_dir.display().to_string()])?;
        let pin = out
            .lines()
            .find_map(|l| l.strip_prefix("host key pin (SPKI SHA-256, for guest configs): "))
            .context("init printed no pin")?
            .to_owned();
        let registry = dir.join("registry");
        std::fs::create_dir_all(&registry)?;
        let mine: Vec<&Vm> = self.vms.iter().filter(|v| v.node == n).collect();
        for vm in &mine {
            self.enroll(&registry, &vm.id, &vm.tpm)?;
        }
        let mut policy = format!(
            "[[image]]\nname = \"{IMAGE}\"\nkeys = [\"{KEY}\"]\nderive = [\"{PURPOSE}\"]\n"
        );
        for i in POLICY_PCRS {
            policy += &format!(
                "[[image.pcr]]\nbank = \"sha256\"\nindex = {i}\nallowed = [\"{}\"]\n",
                hex::encode(SoftTpm::pcr_value(HashAlg::Sha256, i))
            );
        }
        for vm in &mine {
            policy += &format!("[[vm]]\nid = \"{}\"\nimage = \"{IMAGE}\"\n", vm.id);
        }
        let policy_path = dir.join("policy.toml");
        std::fs::write(&policy_path, policy)?;
        self.vkx_ok(&[
            "keys",
            "generate",
            KEY,
            "--node-dir",
            &node_dir.display().to_string(),
            "--allow-image",
            IMAGE,
        ])?;
        let name = format!("node-{n}");
        let metrics = dir.join("metrics.sock");
        let mut toml = format!(
            "node_dir = \"{}\"\nregistry = \"{}\"\npolicy = \"{}\"\nmax_connections = {}\n\n\
             [metrics]\nsocket = \"{}\"\n\n\
             [rollout]\nsource = \"etcd\"\nnode_name = \"{name}\"\n{}\n\
             [[rollout.trusted_key]]\nid = \"{KEY_ID}\"\npublic_key = \"{public}\"\n\n\
             [rollout.etcd]\nendpoints = [\"{}\"]\nkey = \"{}\"\n\
             timeout_ms = 1000\nbackoff_cap_ms = 1000\nreconnect_spread_ms = 200\n",
            node_dir.display(),
            registry.display(),
            policy_path.display(),
            mine.len() + CONNECTION_HEADROOM,
            metrics.display(),
            spec.health_interval_ms
                .map_or_else(String::new, |ms| format!(
                    "health_interval_ms = {ms}\nhealth_prefix = \"{}\"\n",
                    self.health_prefix()
                )),
            self.etcd_endpoint(),
            self.rollout_key(),
        );
        for vm in &mine {
            toml += &format!(
                "\n[[unix_listener]]\npath = \"{}\"\nvm_id = \"{}\"\n",
                vm.socket.display(),
                vm.id
            );
        }
        let config = dir.join("host.toml");
        std::fs::write(&config, toml)?;
        Ok(NodeBox {
            name,
            log: dir.join("host.log"),
            dir,
            node_dir,
            registry,
            config,
            metrics,
            pin,
            host: None,
        })
    }

    /// The first document: the rings, the feature at stage `none`, signed
    /// and pushed through the CLI.
    fn push_initial(&self) -> anyhow::Result<()> {
        let canary: Vec<String> = self
            .vms
            .iter()
            .filter(|v| v.ring == 0)
            .map(|v| format!("\"{}\"", v.id))
            .collect();
        let mut rings = vec![format!(
            "{{\"name\":\"canary\",\"vm_ids\":[{}]}}",
            canary.join(",")
        )];
        for (name, below) in RINGS.iter().skip(1) {
            rings.push(format!(
                "{{\"name\":\"{name}\",\"buckets_below\":{}}}",
                below.unwrap_or(10_000)
            ));
        }
        let issued = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let doc = format!(
            "{{\"format\":1,\"revision\":1,\"issued_at\":{issued},\"rings\":[{}],\
             \"features\":{{\"{}\":{{\"stage\":null,\"killed\":false}}}}}}",
            rings.join(","),
            self.feature.name()
        );
        let doc_path = self.root_path.join("document.json");
        let env_path = self.root_path.join("envelope.json");
        std::fs::write(&doc_path, doc)?;
        self.vkx_ok(&[
            "rollout",
            "sign",
            "--key",
            &self.key_file.display().to_string(),
            "--key-id",
            KEY_ID,
            "--file",
            &doc_path.display().to_string(),
            "--out",
            &env_path.display().to_string(),
        ])?;
        self.rollout(&["push", "--file", &env_path.display().to_string()])?;
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_hosts();
        self.store.stop();
    }
}

impl Store {
    fn start_own(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let mut last = None;
        for _ in 0..5 {
            let mut s = Self::Own {
                child: None,
                data: dir.join("data"),
                client_port: free_port()?,
                peer_port: free_port()?,
                log: dir.join("etcd.log"),
            };
            match s.launch() {
                Ok(()) => return Ok(s),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(dir.join("data"));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let Self::Own {
            child,
            data,
            client_port,
            peer_port,
            log,
        } = self
        else {
            return Ok(());
        };
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let logf = OpenOptions::new().create(true).append(true).open(&*log)?;
        let mut c = Command::new("etcd")
            .arg("--name=vkx-drill")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=vkx-drill={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .context("spawn etcd (apt-get install etcd-server)")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *client_port));
        let deadline = Instant::now() + ETCD_START_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("etcd exited with {status}: {}", tail(log, 10));
            }
            if etcd_healthy(&addr) {
                *child = Some(c);
                return Ok(());
            }
            std::thread::sleep(POLL * 5);
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("etcd did not answer /health within {ETCD_START_LIMIT:?}")
    }

    fn stop(&mut self) {
        if let Self::Own { child, .. } = self
            && let Some(c) = child.take()
        {
            stop_child(c);
        }
    }
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn output_ok(mut cmd: Command) -> anyhow::Result<String> {
    let o = cmd.output().context("run vkx-host")?;
    if !o.status.success() {
        bail!(
            "{:?}: {}{}",
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// SIGTERM (through `kill`, to exactly this pid), SIGKILL after
/// [`STOP_LIMIT`]; waits for the exit.
fn stop_child(mut c: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + STOP_LIMIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

fn etcd_healthy(addr: &SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.take(4096).read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Raises this process's soft limit of open files to `need` (children
/// inherit it), up to the hard limit, with util-linux `prlimit`.
pub fn ensure_fd_limit(need: u64) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files limit")?;
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let soft: u64 = nums
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    let hard: u64 = nums.get(1).and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
    if soft >= need {
        return Ok(());
    }
    ensure!(
        hard >= need,
        "the drill needs {need} open files, the hard limit is {hard}"
    );
    let hard_s = if hard == u64::MAX {
        "unlimited".to_owned()
    } else {
        hard.to_string()
    };
    let ok = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={need}:{hard_s}"),
        ])
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        ok,
        "could not raise the open-files limit to {need}: ulimit -n {need}"
    );
    Ok(())
}
