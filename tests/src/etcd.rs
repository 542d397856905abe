//! A single-member etcd per test: loopback only, free ports, its own data
//! directory (mode 0700) in a temporary directory, killed by PID on drop.
//!
//! It can be stopped (SIGTERM, then SIGKILL), killed, restarted on the
//! same data directory and ports (the same cluster, its data kept),
//! compacted, defragmented and disarmed through `etcdctl`. Every wait is
//! bounded. If `etcd` is not installed the helper panics (the tests must
//! not pass by skipping): `apt-get install etcd-server etcd-client`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long etcd gets to answer `/health` after a start (~0.8 s seen).
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Port pairs tried when another process grabs a port between our probe
/// and etcd's bind.
const MAX_START_ATTEMPTS: usize = 5;
/// How long a SIGTERM may take before a SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of each `etcdctl` command.
const ETCDCTL_TIMEOUT: &str = "5s";
const POLL: Duration = Duration::from_millis(20);

/// Options of [`Etcd::start_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdOptions {
    /// `--quota-backend-bytes`: a tiny quota makes "database space
    /// exceeded" reachable in a test.
    pub quota_backend_bytes: Option<u64>,
}

/// A running etcd with its own data directory.
#[derive(Debug)]
pub struct Etcd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    options: EtcdOptions,
}

impl Etcd {
    /// Starts a fresh, empty etcd.
    pub fn start() -> Self {
        Self::start_with(EtcdOptions::default())
    }

    pub fn start_with(options: EtcdOptions) -> Self {
        let dir = tempfile::tempdir().expect("etcd temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod 0700 the etcd dir");
        let mut etcd = Self {
            dir,
            child: None,
            client_port: 0,
            peer_port: 0,
            options,
        };
        for attempt in 1..=MAX_START_ATTEMPTS {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            if etcd.client_port == etcd.peer_port {
                continue;
            }
            if etcd.launch() {
                return etcd;
            }
            eprintln!("etcd start attempt {attempt} failed:\n{}", etcd.log_tail());
            // A failed first start may leave a half-made member behind.
            let _ = std::fs::remove_dir_all(etcd.data_dir());
        }
        panic!("etcd did not start after {MAX_START_ATTEMPTS} attempts");
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; waits for the exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // `kill -TERM <pid>` signals exactly this process.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
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

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops etcd if it runs and starts it again on the same data
    /// directory and ports.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.launch(), "etcd did not restart:\n{}", self.log_tail());
    }

    /// Runs `etcdctl` (API v3) against this etcd.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg(format!("--command-timeout={ETCDCTL_TIMEOUT}"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run etcdctl (apt-get install etcd-client): {e}"))
    }

    /// `etcdctl` that must succeed; returns its stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Puts `value` at `key` with `etcdctl`, the value on stdin (any size
    /// etcd takes, independent of the code under test).
    pub fn put(&self, key: &str, value: &[u8]) {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg(format!("--command-timeout={ETCDCTL_TIMEOUT}"))
            .args(["put", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl put");
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(value)
            .expect("write the value to etcdctl");
        let out = child.wait_with_output().expect("wait for etcdctl");
        assert!(
            out.status.success(),
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl_ok(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("endpoint status json");
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no revision in {out}"))
    }

    /// Compacts the history up to `revision` (physically: watchers on
    /// older revisions are cancelled at once).
    pub fn compact(&self, revision: i64) {
        self.etcdctl_ok(&["compact", &revision.to_string(), "--physical"]);
    }

    /// The operator's way out of "database space exceeded" once space was
    /// freed: defragment, then disarm the NOSPACE alarm.
    pub fn defrag_and_disarm(&self) {
        self.etcdctl_ok(&["defrag"]);
        self.etcdctl_ok(&["alarm", "disarm"]);
    }

    /// The last lines of etcd's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Starts etcd on the current ports; true once it answers `/health`.
    fn launch(&mut self) -> bool {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        // Append: a restart keeps the earlier log for failure messages. A
        // file, not a pipe, so etcd never blocks on a full pipe.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=vkx-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=vkx-test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        if let Some(q) = self.options.quota_backend_bytes {
            cmd.arg(format!("--quota-backend-bytes={q}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("etcd not installed: apt-get install etcd-server etcd-client")
            }
            Err(e) => panic!("spawn etcd: {e}"),
        };
        if wait_until_healthy(&mut child, self.client_port) {
            self.child = Some(child);
            true
        } else {
            let _ = child.kill();
            let _ = child.wait();
            false
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port the kernel just handed out (free a moment ago).
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Polls `GET /health` until etcd says `"health":"true"`, etcd exits, or
/// [`START_TIMEOUT`] passes.
fn wait_until_healthy(child: &mut Child, port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if health(&addr) {
            return true;
        }
        std::thread::sleep(POLL * 5);
    }
    false
}

fn health(addr: &SocketAddr) -> bool {
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

/// Whether `path` exists with mode 0700 (the data directory etcd wants).
pub fn is_private_dir(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o777 == 0o700)
}

/// A loopback TCP forwarder in front of etcd that a test can cut and
/// restore: a network partition between one client and etcd while etcd
/// itself keeps running (so the test can write and compact meanwhile).
/// While cut, open connections are shut down and new ones closed at once.
#[derive(Debug)]
pub struct CutProxy {
    port: u16,
    shared: std::sync::Arc<ProxyShared>,
}

#[derive(Debug, Default)]
struct ProxyShared {
    cut: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
    /// Both ends of every forwarded connection, to shut them down on a cut.
    conns: std::sync::Mutex<Vec<TcpStream>>,
}

/// Most connections a proxy forwards at once (a source opens one or two).
const MAX_PROXY_CONNS: usize = 64;

impl CutProxy {
    /// Forwards a fresh loopback port to `target` (an etcd client port).
    pub fn start(target: &Etcd) -> Self {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, target.client_port));
        let shared = std::sync::Arc::new(ProxyShared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.closed.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = conn else { continue };
                if s.cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(1)) else {
                    continue;
                };
                let mut conns = s.conns.lock().expect("proxy conns");
                conns.retain(|c| c.peer_addr().is_ok());
                if conns.len() >= MAX_PROXY_CONNS * 2 {
                    continue;
                }
                for c in [&down, &up] {
                    if let Ok(c) = c.try_clone() {
                        conns.push(c);
                    }
                }
                drop(conns);
                pipe(&down, &up);
                pipe(&up, &down);
            }
        });
        Self { port, shared }
    }

    /// The proxied client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Shuts down every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.shared
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shutdown_all();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.shared
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn shutdown_all(&self) {
        let mut conns = self.shared.conns.lock().expect("proxy conns");
        for c in conns.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shutdown_all();
        // Wake the accept loop so its thread ends.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}
