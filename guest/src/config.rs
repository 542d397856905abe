//! `guest.toml`: what the guest agent needs to find, trust and reach its
//! host, and how patiently it retries. Validated completely at load, so a
//! running agent only holds settings that make sense; unknown fields are
//! refused (a typo must not silently fall back to a default).
//!
//! ```toml
//! host_key_sha256 = "<64 hex: the pin vkx-host init printed>"
//! # Transport: AF_VSOCK to the host (CID 2) on this port, the default ...
//! vsock_port = 7861
//! # ... or, for development and tests only, a plain Unix socket:
//! # host_socket = "/run/vkx/host.sock"
//! tcti = "device:/dev/tpmrm0"
//! # The AK's authValue, from `vkx-host vtpm provision` (<vm-id>.ak-auth),
//! # owned by the agent's user, mode 0400; unset: an empty authValue (a
//! # vTPM provisioned before provisioning set one)
//! ak_auth_file = "/etc/vkx/ak-auth"
//! run_dir = "/run/vkx"      # the daemon's status file
//! keys = ["disk"]            # asked for after each attestation
//! key_dir = "/run/vkx/keys"  # delivered here (tmpfs), mode 0400
//! key_owner = 0              # uid and gid of the key files (optional)
//! key_group = 0
//! derived_dir = "/run/vkx/derived"
//!
//! [[derive]]                 # a shared key with the host, per session (§9)
//! purpose = "disk-unlock:v1"
//! length = 32                # 16..64
//!
//! [retry]          # PROTOCOL.md §13; the defaults are the spec's
//! base_ms = 1000
//! cap_ms = 300000
//! floor_ms = 100
//! budget = 30
//! window_s = 3600
//! reprobe_interval_s = 1800
//! reprobe_jitter_s = 300
//! reconnect_spread_s = 128   # after a lost session: first retry U[0, this]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vkx_common::retry::RetryConfig;
use vkx_common::session::transport::VKX_PORT;
use vkx_common::wire::{KeyName, MAX_DERIVE_LEN, MAX_KEYS_PER_REQUEST, MIN_DERIVE_LEN, Purpose};

use crate::transport::Target;

/// Largest configuration file read.
pub const MAX_CONFIG_FILE: u64 = 64 * 1024;

/// Default directory of derived keys (a tmpfs).
pub const DEFAULT_DERIVED_DIR: &str = "/run/vkx/derived";
/// Purposes derived per session.
pub const MAX_DERIVATIONS: usize = 16;

/// Default runtime directory (a tmpfs on systemd machines).
pub const DEFAULT_RUN_DIR: &str = "/run/vkx";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    host_key_sha256: String,
    #[serde(default)]
    host_socket: Option<PathBuf>,
    #[serde(default)]
    vsock_port: Option<u32>,
    #[serde(default)]
    tcti: Option<String>,
    #[serde(default)]
    ak_auth_file: Option<PathBuf>,
    #[serde(default)]
    run_dir: Option<PathBuf>,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    key_dir: Option<PathBuf>,
    #[serde(default)]
    derive: Vec<DeriveFile>,
    #[serde(default)]
    derived_dir: Option<PathBuf>,
    #[serde(default)]
    key_owner: Option<u32>,
    #[serde(default)]
    key_group: Option<u32>,
    #[serde(default)]
    retry: RetryFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeriveFile {
    purpose: String,
    #[serde(default = "default_derive_length")]
    length: u8,
}

fn default_derive_length() -> u8 {
    32
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    base_ms: Option<u64>,
    cap_ms: Option<u64>,
    floor_ms: Option<u64>,
    budget: Option<u32>,
    window_s: Option<u64>,
    reprobe_interval_s: Option<u64>,
    reprobe_jitter_s: Option<u64>,
    reconnect_spread_s: Option<u64>,
}

/// Why `guest.toml` was not loaded: the file could not be read, is not
/// TOML of the expected shape, or holds a value that makes no sense.
/// Every one is the operator's to fix (exit 2 in `vkx-guest`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is larger than {MAX_CONFIG_FILE} bytes", path.display())]
    TooLarge { path: PathBuf },
    /// Malformed TOML, an unknown key or a value of the wrong type.
    #[error(transparent)]
    Syntax(#[from] toml::de::Error),
    /// A well-formed value that is refused: which key, and why.
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// One of the errors above, in the file `path`.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        source: Box<ConfigError>,
    },
}

fn invalid(key: &'static str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_string(),
    }
}

/// A validated `guest.toml`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The host key pin: SPKI SHA-256.
    pub host_key_sha256: [u8; 32],
    pub host: Target,
    /// The TPM; `None`: $VKX_TPM_TCTI, else device:/dev/tpmrm0.
    pub tcti: Option<String>,
    /// The AK's authValue file (PROTOCOL.md §7.6); `None`: empty.
    pub ak_auth_file: Option<PathBuf>,
    /// Runtime state (tmpfs): the daemon's status file.
    pub run_dir: PathBuf,
    /// Log level (even at trace, no key material is logged).
    pub log_level: tracing::Level,
    /// Keys asked for after each attestation (sorted, unique).
    pub keys: Vec<KeyName>,
    /// Where keys are delivered (a tmpfs), owned by `key_owner` /
    /// `key_group` when set.
    pub key_dir: PathBuf,
    pub key_owner: Option<u32>,
    pub key_group: Option<u32>,
    /// Shared keys derived with the host after each attestation (§9):
    /// purpose and length; delivered to `derived_dir`.
    pub derive: Vec<(Purpose, u8)>,
    pub derived_dir: PathBuf,
    pub retry: RetryConfig,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.len() > MAX_CONFIG_FILE {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::from_toml(&text).map_err(|e| ConfigError::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let f: ConfigFile = toml::from_str(text)?;
        let host_key_sha256 = hex::decode(f.host_key_sha256.trim())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| invalid("host_key_sha256", "not 64 hex digits"))?;
        let host = match (f.host_socket, f.vsock_port) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "host_socket",
                    "set host_socket or vsock_port, not both",
                ));
            }
            (Some(p), None) => Target::Unix(p),
            (None, port) => Target::Vsock {
                port: port.unwrap_or(VKX_PORT),
            },
        };
        host.validate().map_err(|e| invalid("host", e))?;
        let d = RetryConfig::default();
        let r = f.retry;
        let ms = |v: Option<u64>, dflt: Duration| v.map_or(dflt, Duration::from_millis);
        let s = |v: Option<u64>, dflt: Duration| v.map_or(dflt, Duration::from_secs);
        let cap = ms(r.cap_ms, d.cap);
        let retry = RetryConfig {
            base: ms(r.base_ms, d.base),
            cap,
            floor: ms(r.floor_ms, d.floor),
            budget: r.budget.unwrap_or(d.budget),
            window: s(r.window_s, d.window),
            reprobe_interval: s(r.reprobe_interval_s, d.reprobe_interval),
            reprobe_jitter: s(r.reprobe_jitter_s, d.reprobe_jitter),
            // Unset, it follows a lowered cap down.
            reconnect_spread: s(r.reconnect_spread_s, d.reconnect_spread.min(cap)),
            ..d
        };
        retry.validate().map_err(|e| invalid("[retry]", e))?;
        let mut keys = f
            .keys
            .iter()
            .map(|k| KeyName::new(k).map_err(|e| invalid("keys", format!("{k:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort();
        keys.dedup();
        if keys.len() > MAX_KEYS_PER_REQUEST {
            return Err(invalid(
                "keys",
                format!("at most {MAX_KEYS_PER_REQUEST} names"),
            ));
        }
        let log_level = match &f.log_level {
            None => tracing::Level::INFO,
            Some(l) => l.parse().map_err(|_| {
                invalid(
                    "log_level",
                    format!("{l:?}: use error, warn, info, debug or trace"),
                )
            })?,
        };
        let mut derive = Vec::with_capacity(f.derive.len());
        for d in &f.derive {
            let p = Purpose::new(&d.purpose)
                .map_err(|e| invalid("derive", format!("{:?}: {e}", d.purpose)))?;
            if !(MIN_DERIVE_LEN..=MAX_DERIVE_LEN).contains(&d.length) {
                return Err(invalid(
                    "derive",
                    format!(
                        "{:?}: length must be {MIN_DERIVE_LEN}..={MAX_DERIVE_LEN}",
                        d.purpose
                    ),
                ));
            }
            if derive.iter().any(|(q, _)| q == &p) {
                return Err(invalid("derive", format!("{:?} twice", d.purpose)));
            }
            derive.push((p, d.length));
        }
        if derive.len() > MAX_DERIVATIONS {
            return Err(invalid(
                "derive",
                format!("at most {MAX_DERIVATIONS} purposes"),
            ));
        }
        Ok(Self {
            host_key_sha256,
            log_level,
            derive,
            derived_dir: f
                .derived_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DERIVED_DIR)),
            keys,
            key_dir: f
                .key_dir
                .unwrap_or_else(|| PathBuf::from(crate::keys::DEFAULT_KEY_DIR)),
            key_owner: f.key_owner,
            key_group: f.key_group,
            host,
            tcti: f.tcti,
            ak_auth_file: f.ak_auth_file,
            run_dir: f.run_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
            retry,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn defaults_are_vsock_and_the_spec_retry_policy() {
        let c = Config::from_toml(&format!("host_key_sha256 = \"{PIN}\"")).unwrap();
        assert_eq!(c.host, Target::Vsock { port: VKX_PORT });
        assert_eq!(c.retry, RetryConfig::default());
    }

    #[test]
    fn refuses_what_makes_no_sense() {
        for bad in [
            format!("host_key_sha256 = \"{PIN}\"\nhost_socket = \"/x\"\nvsock_port = 7861"),
            format!("host_key_sha256 = \"{PIN}\"\nvsock_port = 80"),
            format!("host_key_sha256 = \"{PIN}\"\nhost_sockett = \"/x\""),
            "host_key_sha256 = \"00\"".to_string(),
            format!("host_key_sha256 = \"{PIN}\"\n[retry]\nbudget = 0"),
            format!("host_key_sha256 = \"{PIN}\"\n[retry]\nfloor_ms = 0"),
            format!("host_key_sha256 = \"{PIN}\"\n[retry]\nbase_ms = 10\ncap_ms = 5"),
            format!("host_key_sha256 = \"{PIN}\"\n[retry]\nbugdet = 3"),
            format!("host_key_sha256 = \"{PIN}\"\n[retry]\nreconnect_spread_s = 301"),
        ] {
            assert!(Config::from_toml(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_their_cause_and_key() {
        let with =
            |extra: &str| Config::from_toml(&format!("host_key_sha256 = \"{PIN}\"\n{extra}"));
        assert!(matches!(with("bugdet = 3"), Err(ConfigError::Syntax(_))));
        assert!(matches!(
            with("log_level = \"loud\""),
            Err(ConfigError::Invalid {
                key: "log_level",
                ..
            })
        ));
        // The derivation lengths are the wire's (PROTOCOL.md §6.9).
        for (length, ok) in [
            (MIN_DERIVE_LEN - 1, false),
            (MIN_DERIVE_LEN, true),
            (MAX_DERIVE_LEN, true),
            (MAX_DERIVE_LEN + 1, false),
        ] {
            let c = with(&format!(
                "[[derive]]\npurpose = \"p:v1\"\nlength = {length}"
            ));
            match c {
                Ok(c) => assert!(ok && c.derive[0].1 == length, "{length}"),
                Err(e) => assert!(
                    !ok && matches!(e, ConfigError::Invalid { key: "derive", .. }),
                    "{length}: {e}"
                ),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.toml");
        assert!(matches!(Config::load(&path), Err(ConfigError::Read { .. })));
        std::fs::write(&path, "host_key_sha256 = \"00\"").unwrap();
        let e = Config::load(&path).unwrap_err();
        assert!(matches!(&e, ConfigError::InFile { source, .. }
            if matches!(**source, ConfigError::Invalid { key: "host_key_sha256", .. })));
        assert!(e.to_string().starts_with(&path.display().to_string()));
    }

    #[test]
    fn unix_socket_and_retry_tunables() {
        let c = Config::from_toml(&format!(
            "host_key_sha256 = \"{PIN}\"\nhost_socket = \"/tmp/h.sock\"\n[retry]\nbase_ms = 200\ncap_ms = 1000\nfloor_ms = 50"
        ))
        .unwrap();
        assert_eq!(c.host, Target::Unix("/tmp/h.sock".into()));
        assert_eq!(c.retry.base, Duration::from_millis(200));
        assert_eq!(c.retry.budget, 30);
        assert_eq!(c.retry.reconnect_spread, Duration::from_secs(1));
        let c = Config::from_toml(&format!(
            "host_key_sha256 = \"{PIN}\"\n[retry]\nreconnect_spread_s = 20"
        ))
        .unwrap();
        assert_eq!(c.retry.reconnect_spread, Duration::from_secs(20));
    }
}
