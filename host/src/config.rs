//! `host.toml`, the configuration of `vkx-host serve`: typed, with safe
//! defaults, loaded completely and checked at start
//! (`deny_unknown_fields` everywhere, so a misspelt key fails loudly
//! instead of being ignored).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::admission::{AdmissionConfig, Limits};
use crate::metrics::MetricsConfig;
use crate::rollout_service::{RolloutConfig, Settings, SettingsError};
use crate::vsock::VsockListenerConfig;

/// Default connection limit: one per VM of a large node, with headroom.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// Largest host.toml read: a `[vsock]` map of 4,096 VMs and every table
/// fit many times over; a wrong path cannot exhaust memory.
pub const MAX_HOST_TOML: u64 = 4 * 1024 * 1024;
/// Most Unix listeners one host serves (one per VM in development).
pub const MAX_LISTENERS: usize = 4096;
/// Most async worker threads `worker_threads` may ask for: beyond the
/// cores of any node this agent runs on, each thread costs a stack and a
/// malloc arena for nothing.
pub const MAX_WORKER_THREADS: usize = 64;
/// Default `max_blocking_threads`: threads running quote verification and
/// the registry's `fdatasync` of each attestation. Enough to keep both
/// cores and the disk busy in a boot storm; the rest queue (FIFO) instead
/// of growing the pool to one thread per handshake (hundreds of stacks,
/// and the directory lock they contend for).
pub const DEFAULT_MAX_BLOCKING_THREADS: usize = 16;
/// Largest `max_blocking_threads` accepted.
pub const MAX_BLOCKING_THREADS: usize = 512;

/// `host.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The directory `vkx-host init` made.
    pub node_dir: PathBuf,
    pub registry: PathBuf,
    pub policy: PathBuf,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_reattest")]
    pub reattest_after_s: u32,
    /// `retry-after` in the `goodbye` live sessions get at shutdown: how
    /// long guests wait before reconnecting (plus up to 10 % jitter).
    /// Short for a quick restart; longer for a planned outage.
    #[serde(default = "default_shutdown_retry_after")]
    pub shutdown_retry_after_s: u32,
    /// What a quote whose TPM clock state went back (a snapshot restore
    /// or a clone, PROTOCOL.md §15.8) gets: `refuse` (default; the VM
    /// stays refused until `vkx-host vtpm accept-rewind`) or `flag`
    /// (served, logged and counted). Either way the VM's other live
    /// sessions are told to re-attest.
    #[serde(default)]
    pub on_rewind: OnRewind,
    /// Development transport: one socket per VM (PROTOCOL.md §2.4).
    #[serde(default)]
    pub unix_listener: Vec<UnixListenerConfig>,
    /// Hybrid vsock (Firecracker, Cloud Hypervisor, vhost-device-vsock):
    /// the guest's connections to host port P arrive on `<path>_<P>`
    /// (PROTOCOL.md §2.3.1); the socket is the VM's identity.
    #[serde(default)]
    pub hybrid_vsock: Vec<HybridVsockConfig>,
    /// AF_VSOCK (§2.2): listen on every CID at `port`; the peer's CID,
    /// set by the hypervisor, is the VM's identity.
    #[serde(default)]
    pub vsock: Option<VsockListenerConfig>,
    /// The key store directory; default `<node_dir>/keys`. Sealed under
    /// the node's master key (`<node_dir>/master.key`).
    #[serde(default)]
    pub key_store: Option<PathBuf>,
    /// Log level: error, warn, info (default), debug or trace. Even at
    /// trace, no key material and no raw peer bytes are logged.
    #[serde(default)]
    pub log_level: LogLevel,
    /// The local socket for derived keys (§9.4); none by default.
    #[serde(default)]
    pub local: Option<crate::derive::LocalConfig>,
    /// Admission control and rate limits (`[admission]`); every key has a
    /// default (see [`crate::admission`]).
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// The metrics endpoint (`[metrics]`); none without the table.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Staged rollout and kill switch (`[rollout]`, spec/ROLLOUT.md):
    /// where the rollout document comes from, who may sign a widening,
    /// which features are generally available. Without the table: no
    /// source, every feature generally available, the local override file
    /// at `<node_dir>/rollout/override.toml`.
    #[serde(default)]
    pub rollout: Option<RolloutConfig>,
    /// Async worker threads of `serve` (1..=[`MAX_WORKER_THREADS`]);
    /// default one per available core, at most that cap.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Threads for blocking work (quote verification and the registry
    /// record of each attestation, file I/O);
    /// 1..=[`MAX_BLOCKING_THREADS`], default
    /// [`DEFAULT_MAX_BLOCKING_THREADS`]. More blocking work waits in line.
    #[serde(default)]
    pub max_blocking_threads: Option<usize>,
}

/// The threads `serve` runs on, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    pub workers: usize,
    pub max_blocking: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridVsockConfig {
    /// The VM's vsock Unix socket as the VMM names it (without `_<port>`).
    pub path: PathBuf,
    pub vm_id: String,
    #[serde(default = "default_port")]
    pub port: u32,
}

fn default_port() -> u32 {
    vkx_common::session::transport::VKX_PORT
}

impl HybridVsockConfig {
    /// The socket the host listens on: `<path>_<port>`.
    pub fn listen_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{}", self.port));
        PathBuf::from(p)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixListenerConfig {
    pub path: PathBuf,
    pub vm_id: String,
}

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

fn default_reattest() -> u32 {
    3600
}

/// `on_rewind` in host.toml.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRewind {
    #[default]
    Refuse,
    Flag,
}

/// `log_level` in host.toml: parsed once, at load; unset is `info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct LogLevel(pub tracing::Level);

impl Default for LogLevel {
    fn default() -> Self {
        Self(tracing::Level::INFO)
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;

    fn try_from(l: String) -> Result<Self, String> {
        l.parse()
            .map(Self)
            .map_err(|_| format!("log_level {l:?}: use error, warn, info, debug or trace"))
    }
}

fn default_shutdown_retry_after() -> u32 {
    30
}

/// Largest `shutdown_retry_after_s`: a day, the guests' own cap.
pub const MAX_SHUTDOWN_RETRY_AFTER_S: u32 = 24 * 3600;

/// Why host.toml cannot be served: each names the file or the setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is larger than {MAX_HOST_TOML} bytes", .0.display())]
    TooLarge(PathBuf),
    #[error("{}: {source}", .path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{}: [vsock]: {source}", .path.display())]
    Vsock {
        path: PathBuf,
        source: crate::vsock::VsockConfigError,
    },
    #[error("{}: no listener configured", .0.display())]
    NoListener(PathBuf),
    #[error("more than {MAX_LISTENERS} listeners")]
    TooManyListeners,
    #[error("max_connections must be 1..=65536")]
    MaxConnections,
    #[error("shutdown_retry_after_s must be 1..={MAX_SHUTDOWN_RETRY_AFTER_S}")]
    ShutdownRetryAfter,
    #[error("worker_threads must be 1..={MAX_WORKER_THREADS}")]
    WorkerThreads,
    #[error("max_blocking_threads must be 1..={MAX_BLOCKING_THREADS}")]
    BlockingThreads,
    #[error("{}: {source}", .path.display())]
    Rollout {
        path: PathBuf,
        source: SettingsError,
    },
    #[error("{}: {source}", .path.display())]
    Admission {
        path: PathBuf,
        source: crate::admission::AdmissionConfigError,
    },
    #[error("{}: [metrics]: {source}", .path.display())]
    Metrics {
        path: PathBuf,
        source: crate::metrics::MetricsConfigError,
    },
    /// A setting of its own (the thread counts) at load: named with the file.
    #[error("{}: {source}", .path.display())]
    Setting {
        path: PathBuf,
        source: Box<ConfigError>,
    },
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_text(path, &Self::read(path)?)
    }

    /// host.toml's text, at most [`MAX_HOST_TOML`] bytes.
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        use std::io::Read as _;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_HOST_TOML + 1).read_to_string(&mut text))
            .map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
        if text.len() as u64 > MAX_HOST_TOML {
            return Err(ConfigError::TooLarge(path.to_owned()));
        }
        Ok(text)
    }

    /// Parses and checks host.toml's `text` (read from `path`, which the
    /// errors name).
    pub fn from_text(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let path_buf = || path.to_owned();
        let c: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path_buf(),
            source,
        })?;
        if let Some(v) = &c.vsock {
            v.validate().map_err(|source| ConfigError::Vsock {
                path: path_buf(),
                source,
            })?;
        }
        let listeners =
            c.unix_listener.len() + c.hybrid_vsock.len() + usize::from(c.vsock.is_some());
        if listeners == 0 {
            return Err(ConfigError::NoListener(path_buf()));
        }
        if listeners > MAX_LISTENERS {
            return Err(ConfigError::TooManyListeners);
        }
        if !(1..=65_536).contains(&c.max_connections) {
            return Err(ConfigError::MaxConnections);
        }
        if !(1..=MAX_SHUTDOWN_RETRY_AFTER_S).contains(&c.shutdown_retry_after_s) {
            return Err(ConfigError::ShutdownRetryAfter);
        }
        c.rollout().map_err(|source| ConfigError::Rollout {
            path: path_buf(),
            source,
        })?;
        c.threads().map_err(|e| ConfigError::Setting {
            path: path_buf(),
            source: Box::new(e),
        })?;
        c.limits().map_err(|source| ConfigError::Admission {
            path: path_buf(),
            source,
        })?;
        if let Some(m) = &c.metrics {
            m.endpoint().map_err(|source| ConfigError::Metrics {
                path: path_buf(),
                source,
            })?;
        }
        Ok(c)
    }

    /// The checked `[rollout]` settings.
    pub fn rollout(&self) -> Result<Settings, SettingsError> {
        Settings::new(self.rollout.as_ref(), &self.node_dir)
    }

    /// The checked thread counts: `worker_threads` defaults to the cores
    /// this process may run on (its CPU affinity, e.g. `taskset`), capped.
    pub fn threads(&self) -> Result<Threads, ConfigError> {
        let workers = match self.worker_threads {
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(MAX_WORKER_THREADS),
        };
        if !(1..=MAX_WORKER_THREADS).contains(&workers) {
            return Err(ConfigError::WorkerThreads);
        }
        let max_blocking = self
            .max_blocking_threads
            .unwrap_or(DEFAULT_MAX_BLOCKING_THREADS);
        if !(1..=MAX_BLOCKING_THREADS).contains(&max_blocking) {
            return Err(ConfigError::BlockingThreads);
        }
        Ok(Threads {
            workers,
            max_blocking,
        })
    }

    /// The checked admission limits.
    pub fn limits(&self) -> Result<Limits, crate::admission::AdmissionConfigError> {
        Limits::new(self.max_connections, &self.admission)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn load(extra: &str) -> Result<ServeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(
            &path,
            format!("node_dir = \"/n\"\nregistry = \"/r\"\npolicy = \"/p\"\n{extra}"),
        )
        .unwrap();
        ServeConfig::load(&path)
    }

    #[test]
    fn each_transport_alone_is_a_listener() {
        assert!(load("").is_err(), "no listener at all");
        let c = load("[vsock]\nvm = [ { cid = 17, vm_id = \"vm-17\" } ]\n").unwrap();
        let v = c.vsock.unwrap();
        assert_eq!(v.port, vkx_common::session::transport::VKX_PORT);
        assert!(v.require_privileged_port, "on by default on AF_VSOCK");
        assert_eq!(v.cid_map().unwrap().get(17).unwrap().as_str(), "vm-17");
        let c = load("[[hybrid_vsock]]\npath = \"/run/vm.vsock\"\nvm_id = \"vm-1\"\n").unwrap();
        assert_eq!(
            c.hybrid_vsock[0].listen_path(),
            PathBuf::from("/run/vm.vsock_7861")
        );
        assert_eq!(c.shutdown_retry_after_s, 30);
    }

    #[test]
    fn refuses_what_makes_no_sense() {
        for bad in [
            "[vsock]\nport = 80\nvm = [ { cid = 17, vm_id = \"vm-17\" } ]\n",
            "[vsock]\nvm = [ { cid = 2, vm_id = \"vm-17\" } ]\n",
            "[vsock]\nvm = [ { cid = 17, vm_id = \"a\" }, { cid = 17, vm_id = \"b\" } ]\n",
            "[vsock]\nvm = [ { cid = 17, vm_id = \"vm-17\" } ]\nports = 1\n",
            "shutdown_retry_after_s = 0\n[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n",
            "max_connections = 0\n[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n",
            "worker_threads = 0\n[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n",
            "worker_threads = 65\n[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n",
            "max_blocking_threads = 0\n[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n",
            "max_blocking_threads = 513\n[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn threads_default_to_the_cores_and_a_capped_blocking_pool() {
        let c = load(UNIX).unwrap();
        let t = c.threads().unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(t.workers, cores.min(MAX_WORKER_THREADS));
        assert_eq!(t.max_blocking, DEFAULT_MAX_BLOCKING_THREADS);
        let c = load(&format!(
            "worker_threads = 1\nmax_blocking_threads = 4\n{UNIX}"
        ))
        .unwrap();
        assert_eq!(
            c.threads().unwrap(),
            Threads {
                workers: 1,
                max_blocking: 4
            }
        );
    }

    #[test]
    fn a_host_toml_over_the_size_cap_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        let head = format!("node_dir = \"/n\"\nregistry = \"/r\"\npolicy = \"/p\"\n{UNIX}");
        let pad = usize::try_from(MAX_HOST_TOML).unwrap() - head.len();
        std::fs::write(&path, format!("{head}{}", "#".repeat(pad))).unwrap();
        assert!(ServeConfig::load(&path).is_ok(), "at the cap");
        std::fs::write(&path, format!("{head}{}", "#".repeat(pad + 1))).unwrap();
        let e = ServeConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    const UNIX: &str = "[[unix_listener]]\npath = \"/s\"\nvm_id = \"v\"\n";

    #[test]
    fn the_log_level_is_parsed_once_at_load() {
        assert_eq!(load(UNIX).unwrap().log_level.0, tracing::Level::INFO);
        let c = load(&format!("log_level = \"trace\"\n{UNIX}")).unwrap();
        assert_eq!(c.log_level.0, tracing::Level::TRACE);
        let e = load(&format!("log_level = \"loud\"\n{UNIX}")).unwrap_err();
        assert!(e.to_string().contains("use error, warn, info"), "{e}");
    }

    #[test]
    fn admission_and_metrics_have_safe_defaults() {
        let c = load(UNIX).unwrap();
        let l = c.limits().unwrap();
        assert_eq!(l.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(l.max_open, 2 * DEFAULT_MAX_CONNECTIONS);
        assert_eq!(l.max_handshakes, crate::admission::DEFAULT_MAX_HANDSHAKES);
        assert!(c.metrics.is_none(), "no endpoint unless configured");
        let c = load(&format!(
            "max_connections = 10\n[admission]\nmax_handshakes = 3\nmax_open = 12\n\
             busy_retry_after_ms = 900\n[metrics]\n{UNIX}"
        ))
        .unwrap();
        let l = c.limits().unwrap();
        assert_eq!((l.max_handshakes, l.max_open), (3, 12));
        assert_eq!(l.busy_retry_after, Duration::from_millis(900));
        assert_eq!(
            c.metrics.unwrap().endpoint().unwrap(),
            crate::metrics::Endpoint::Unix(PathBuf::from(crate::metrics::DEFAULT_METRICS_SOCKET))
        );
        let c = load(&format!(
            "[metrics]\nlisten = \"0.0.0.0:9461\"\nallow_non_loopback = true\n{UNIX}"
        ))
        .unwrap();
        assert!(c.metrics.is_some());
    }

    #[test]
    fn refuses_admission_and_metrics_that_make_no_sense() {
        for bad in [
            "[admission]\nmax_handshakes = 0\n",
            "[admission]\nbogus = 1\n",
            "max_connections = 10\n[admission]\nmax_open = 9\n",
            "[admission]\nretry_jitter_percent = 500\n",
            "[admission]\npeer_connection_refill_ms = 0\n",
            "[metrics]\nlisten = \"0.0.0.0:9461\"\n",
            "[metrics]\nlisten = \"localhost:9461\"\n",
            "[metrics]\nsocket = \"/m\"\nlisten = \"127.0.0.1:9461\"\n",
            "[metrics]\nport = 1\n",
        ] {
            assert!(load(&format!("{bad}{UNIX}")).is_err(), "{bad}");
        }
    }
}
