//! A whole node for agent tests: swtpm as the guest's vTPM, provisioned
//! by `vkx-host vtpm provision`, a policy holding the vTPM's current PCRs
//! 0 and 7, a `host.toml` with a Unix listener and a hybrid-vsock
//! listener, and helpers to run `vkx-host serve` and `vkx-guest` as
//! processes and to signal them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::node::Node;
use crate::swtpm::Swtpm;
use crate::{bin, run};

/// Longest wait for the host's socket to appear.
pub const STARTUP_LIMIT: Duration = Duration::from_secs(20);
/// Longest wait for a process to exit after SIGTERM.
pub const STOP_LIMIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

/// A provisioned VM and its host node, in one temporary directory.
#[derive(Debug)]
pub struct Deployment {
    pub work: tempfile::TempDir,
    pub tpm: Swtpm,
    pub node: Node,
    pub vm_id: String,
}

impl Deployment {
    /// Provisions `vm_id`'s vTPM and writes policy.toml and host.toml
    /// (`host_extra` is appended to host.toml's top level).
    pub fn new(vm_id: &str, host_extra: &str) -> Self {
        let work = tempfile::tempdir().unwrap();
        let tpm = Swtpm::start();
        let node = Node::new();
        let o = node.provision(&tpm, vm_id, "ecc");
        assert!(o.status.success(), "provision: {o:?}");
        let d = Self {
            work,
            tpm,
            node,
            vm_id: vm_id.to_owned(),
        };
        d.write_policy();
        d.write_host_config(host_extra);
        d
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// The plain Unix socket the host serves this VM on.
    pub fn socket(&self) -> PathBuf {
        self.path("vm.sock")
    }

    /// The VMM's hybrid-vsock socket (the host listens on `<it>_7861`).
    pub fn vsock_path(&self) -> PathBuf {
        self.path("vm.vsock")
    }

    pub fn host_config(&self) -> PathBuf {
        self.path("host.toml")
    }

    fn write_policy(&self) {
        let o = run(
            "vkx-guest",
            &[
                "evidence",
                "--tcti",
                &self.tpm.tcti(),
                "--ak-auth-file",
                &self.node.ak_auth_file(&self.vm_id),
                "--nonce",
                &"00".repeat(32),
                "--pcrs",
                "sha256:0,7",
                "--out-dir",
                &self.path("ref").display().to_string(),
            ],
            b"",
        );
        assert!(o.status.success(), "evidence: {o:?}");
        let pcrs: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.path("ref/pcrs.json")).unwrap()).unwrap();
        let mut policy = format!(
            "[[image]]\nname = \"img\"\nkeys = [\"disk\"]\nderive = [\"disk-unlock:v1\"]\n\n[[vm]]\nid = \"{}\"\nimage = \"img\"\n",
            self.vm_id
        );
        for i in ["0", "7"] {
            policy += &format!(
                "\n[[vm.pcr]]\nbank = \"sha256\"\nindex = {i}\nallowed = [\"{}\"]\n",
                pcrs["sha256"][i].as_str().unwrap()
            );
        }
        std::fs::write(self.path("policy.toml"), policy).unwrap();
    }

    /// (Re)writes host.toml; `extra` goes at its top level.
    pub fn write_host_config(&self, extra: &str) {
        std::fs::write(
            self.host_config(),
            format!(
                "node_dir = \"{}\"\nregistry = \"{}\"\npolicy = \"{}\"\n{extra}\n\n\
                 [[unix_listener]]\npath = \"{}\"\nvm_id = \"{vm}\"\n\n\
                 [[hybrid_vsock]]\npath = \"{}\"\nvm_id = \"{vm}\"\n",
                self.node.node_dir(),
                self.node.registry(),
                self.path("policy.toml").display(),
                self.socket().display(),
                self.vsock_path().display(),
                vm = self.vm_id,
            ),
        )
        .unwrap();
    }

    /// Writes a guest.toml named `name` that reaches the host on `socket`
    /// with `pin`; `extra` is appended (e.g. a `[retry]` table).
    pub fn guest_config(&self, name: &str, socket: &Path, pin: &str, extra: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(
            &path,
            format!(
                "host_socket = \"{}\"\nhost_key_sha256 = \"{pin}\"\ntcti = \"{}\"\nak_auth_file = \"{}\"\nrun_dir = \"{}\"\n{extra}\n",
                socket.display(),
                self.tpm.tcti(),
                self.node.ak_auth_file(&self.vm_id),
                self.path("run").display(),
            ),
        )
        .unwrap();
        path
    }

    /// Starts `vkx-host serve` and waits for its Unix socket.
    pub fn start_host(&self, log: &str) -> Agent {
        self.start_host_with(
            &[
                "serve",
                "--config",
                &self.host_config().display().to_string(),
            ],
            log,
        )
    }

    /// Starts `vkx-host` with `args` (a `serve` command line) and waits
    /// for this deployment's Unix socket.
    pub fn start_host_with(&self, args: &[&str], log: &str) -> Agent {
        let _ = std::fs::remove_file(self.socket());
        let agent = Agent::spawn("vkx-host", args, self.path(log));
        agent.wait_for_path(&self.socket());
        agent
    }
}

/// A running agent process whose stderr goes to a log file; killed when
/// dropped.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    pub fn spawn(name: &str, args: &[&str], log: PathBuf) -> Self {
        let child = Command::new(bin(name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "KILL", "STOP", "CONT").
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.pid());
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait(STOP_LIMIT)
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded by [`STARTUP_LIMIT`]) until `path` exists: a socket
    /// this process creates. On a timeout, the failure shows its log.
    pub fn wait_for_path(&self, path: &Path) {
        let start = Instant::now();
        while !path.exists() {
            assert!(
                start.elapsed() < STARTUP_LIMIT,
                "{} never appeared: {}",
                path.display(),
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits (bounded by `limit`) for the process to exit by itself.
    pub fn wait_exit(mut self, limit: Duration) -> std::process::ExitStatus {
        self.wait(limit)
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "process did not exit: {}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the log satisfies `pred` (bounded by `limit`).
    pub fn wait_log(&self, limit: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if pred(&log) {
                return log;
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}; log:\n{log}"
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connections waiting in the accept queue of the listening socket at
/// `path` (from /proc/net/unix: the not yet accepted server ends carry
/// the listener's path; the listener itself has the flag `__SO_ACCEPTCON`,
/// 00010000). Lets a test freeze a host (SIGSTOP) and know that a guest's
/// connection, and so its TLS handshake, is pending.
pub fn pending_connections(path: &Path) -> usize {
    let want = path.display().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8 && f[7] == want && f[3] != "00010000"
        })
        .count()
}

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// `vkx-host metrics --socket` against a running host: the Prometheus text.
pub fn scrape(metrics: &Path) -> String {
    let o = run(
        "vkx-host",
        &["metrics", "--socket", &metrics.display().to_string()],
        b"",
    );
    assert!(o.status.success(), "vkx-host metrics: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// The value of one series, e.g. `vkx_errors_sent_total{code="busy"}`.
pub fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// Scrapes until `series` reads `want` (bounded by [`STARTUP_LIMIT`]).
pub fn wait_value(metrics: &Path, series: &str, want: u64) -> String {
    let t = Instant::now();
    loop {
        let text = scrape(metrics);
        if value(&text, series) == want {
            return text;
        }
        assert!(
            t.elapsed() < STARTUP_LIMIT,
            "{series} never reached {want}:\n{text}"
        );
        std::thread::sleep(POLL);
    }
}
