//! A software TPM (swtpm) per test: TPM 2.0 on loopback TCP, state in a
//! temporary directory, killed by PID when dropped.
//!
//! If `swtpm` is not installed the helper panics (the tests must not pass
//! by skipping): `make test` installs it.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long swtpm gets to accept connections after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Port pairs tried when another process grabs a port between our probe
/// and swtpm's bind.
const MAX_START_ATTEMPTS: usize = 5;
/// How long a graceful shutdown (swtpm_ioctl -s) may take before a kill.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// A running swtpm with its own state directory.
#[derive(Debug)]
pub struct Swtpm {
    state: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

impl Swtpm {
    /// Starts a fresh swtpm (empty state: a new vTPM).
    pub fn start() -> Self {
        let state = tempfile::tempdir().expect("swtpm state dir");
        let mut tpm = Self {
            state,
            child: None,
            port: 0,
        };
        tpm.launch();
        tpm
    }

    /// The TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Stops swtpm (gracefully, so its state is saved) and starts it again
    /// on the same state: the VM booting after the host provisioned it.
    /// The port may change: call [`Swtpm::tcti`] again.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn launch(&mut self) {
        for _ in 0..MAX_START_ATTEMPTS {
            let port = free_port_pair();
            let mut child = match Command::new("swtpm")
                .args(["socket", "--tpm2"])
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", self.state.path().display()))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
            {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    panic!("swtpm not installed: run `make test` (it installs swtpm)")
                }
                Err(e) => panic!("spawn swtpm: {e}"),
            };
            if wait_until_listening(&mut child, port) {
                self.child = Some(child);
                self.port = port;
                return;
            }
            // Lost a port race (or swtpm failed): reap it and try new ports.
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait for swtpm");
            eprintln!(
                "swtpm on port {port} did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("swtpm did not start after {MAX_START_ATTEMPTS} attempts");
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Graceful: TPM2_Shutdown-like save of volatile state, then exit.
        let _ = Command::new("swtpm_ioctl")
            .args(["--tcp", &format!("127.0.0.1:{}", self.port + 1), "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill signals exactly this process by its PID.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port P with P+1 also free (swtpm's data and control ports), as the
/// kernel hands them out: bind port 0 and check the neighbour.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
        let port = a.local_addr().expect("local addr").port();
        if port == u16::MAX {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of loopback ports");
}

fn wait_until_listening(child: &mut Child, port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect_timeout(&addr, POLL * 5).is_ok() {
            return true;
        }
        std::thread::sleep(POLL);
    }
    false
}
