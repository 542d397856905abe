//! What the guest does with an attested session's keys: asks for the keys
//! its configuration names, installs each released key in the key
//! directory ([`crate::keys::KeyDir`]), and installs and acknowledges every
//! rotation the host pushes. Shared by `once` (which ends the session when
//! the keys are in) and the daemon (which holds it for rotations).
//!
//! Logs name keys and versions, never material; a refusal is logged with
//! its code only (the reason stays on the host).

use std::time::Instant;

use vkx_common::session::Output;
use vkx_common::session::guest::{Guest, GuestEvent};
use vkx_common::wire::{KeyMaterial, KeyName, Purpose, ReleasedKey};
use vkx_common::{rl_info, rl_warn};

use crate::agent::Reaction;
use crate::config::Config;
use crate::keys::KeyDir;

/// The delivery state of one session.
#[derive(Debug)]
pub struct Deliver<'a> {
    names: &'a [KeyName],
    dir: Option<&'a KeyDir>,
    derive: &'a [(Purpose, u8)],
    derived_dir: Option<&'a KeyDir>,
    /// Derivations not yet confirmed or failed.
    pub derive_pending: usize,
    /// Derived keys installed in this session (by purpose).
    pub derived: Vec<Purpose>,
    /// Keys installed in this session: name, version.
    pub installed: Vec<(KeyName, u32)>,
    /// Keys the host refused or that could not be installed.
    pub failed: Vec<(KeyName, String)>,
    /// The initial request is answered (or there was nothing to ask).
    pub done: bool,
}

impl<'a> Deliver<'a> {
    pub fn new(
        names: &'a [KeyName],
        dir: Option<&'a KeyDir>,
        derive: &'a [(Purpose, u8)],
        derived_dir: Option<&'a KeyDir>,
    ) -> Self {
        Self {
            names,
            dir,
            derive,
            derived_dir,
            derive_pending: 0,
            derived: Vec::new(),
            installed: Vec::new(),
            failed: Vec::new(),
            done: false,
        }
    }

    /// Everything asked for is answered (keys and derivations).
    pub fn complete(&self) -> bool {
        self.done && self.derive_pending == 0
    }

    /// Handles the key-related events; returns what to send and the
    /// derivations to run.
    pub fn on_event(&mut self, ev: &GuestEvent, guest: &mut Guest, now: Instant) -> Reaction {
        let mut out = Output::default();
        let mut derive = Vec::new();
        match ev {
            GuestEvent::Attested { .. } => {
                derive = self.derive.to_vec();
                self.derive_pending = derive.len();
                if self.names.is_empty() {
                    self.done = true;
                } else if let Guest::Established(s) = guest {
                    match s.request_keys(self.names.to_vec(), now) {
                        Ok(o) => out = o,
                        Err(e) => {
                            rl_warn!(error = %e, "keys not requested");
                            self.done = true;
                        }
                    }
                }
            }
            GuestEvent::Keys(release) => {
                for key in &release.released {
                    self.install(key);
                }
                for r in &release.refused {
                    rl_warn!(key = %r.name, code = %r.code, "the host withheld a key");
                    self.failed
                        .push((r.name.clone(), format!("refused: {}", r.code)));
                }
                self.done = true;
            }
            GuestEvent::FeatureHeld { .. } => {
                rl_warn!("key release is held back by the host (rollout or kill switch)");
                self.done = true;
            }
            GuestEvent::KeyUpdate { update_id, key } => {
                let installed = self.install(key);
                if let Guest::Established(s) = guest {
                    out = s.ack_update(*update_id, key, installed, now);
                }
            }
            _ => {}
        }
        Reaction {
            out,
            derive,
            finish: false,
        }
    }

    /// K for `purpose` is confirmed: install it in the derived directory.
    pub fn on_derived(&mut self, purpose: &Purpose, key: &[u8]) {
        self.derive_pending = self.derive_pending.saturating_sub(1);
        let (Some(dir), Ok(name)) = (self.derived_dir, KeyName::new(purpose.as_str())) else {
            return;
        };
        let k = ReleasedKey {
            name,
            version: 1,
            material: KeyMaterial::new(key.to_vec()),
        };
        match dir.install(&k) {
            Ok(path) => {
                rl_info!(purpose = %purpose, path = %path.display(), "derived key delivered");
                self.derived.push(purpose.clone());
            }
            Err(e) => {
                rl_warn!(purpose = %purpose, error = %e, "derived key not installed");
                self.failed
                    .push((k.name, format!("derived key not installed: {e}")));
            }
        }
    }

    pub fn on_derive_failed(&mut self, purpose: &Purpose, why: &str) {
        self.derive_pending = self.derive_pending.saturating_sub(1);
        rl_warn!(purpose = %purpose, why, "no derived key");
        if let Ok(name) = KeyName::new(purpose.as_str()) {
            self.failed.push((name, format!("derivation: {why}")));
        }
    }

    fn install(&mut self, key: &ReleasedKey) -> bool {
        let Some(dir) = self.dir else {
            self.failed
                .push((key.name.clone(), "no key directory".into()));
            return false;
        };
        match dir.install(key) {
            Ok(path) => {
                rl_info!(
                    key = %key.name,
                    version = key.version,
                    path = %path.display(),
                    "key delivered"
                );
                self.installed.push((key.name.clone(), key.version));
                true
            }
            Err(e) => {
                rl_warn!(key = %key.name, error = %e, "key not installed");
                self.failed.push((key.name.clone(), e.to_string()));
                false
            }
        }
    }
}

/// Opens the key directory and the derived-key directory the
/// configuration needs (none when it asks for nothing), warning when one
/// is not on a tmpfs.
pub fn open_dirs(config: &Config) -> anyhow::Result<(Option<KeyDir>, Option<KeyDir>)> {
    let open = |wanted: bool, path: &std::path::Path| -> anyhow::Result<Option<KeyDir>> {
        if !wanted {
            return Ok(None);
        }
        let d = KeyDir::open(path, config.key_owner, config.key_group)
            .map_err(|e| anyhow::anyhow!("key directory: {e}"))?;
        if !d.on_tmpfs() {
            rl_warn!(
                dir = %path.display(),
                "not on a tmpfs: delivered keys reach a disk"
            );
        }
        Ok(Some(d))
    };
    Ok((
        open(!config.keys.is_empty(), &config.key_dir)?,
        open(!config.derive.is_empty(), &config.derived_dir)?,
    ))
}
